"""What keeps a run from hanging or failing on a flaky cluster: the training workers' stall guard, and the
object-storage retry policy exercised through a fault-injecting S3 proxy."""

from __future__ import annotations

import threading
import time

import pytest

from rxray.train.worker import DataStalled, stall_guarded


def _slow(items, delay_s: float, then_block: threading.Event | None = None):
    """Yield ``items`` ``delay_s`` apart; then wait on ``then_block`` (a stream whose next block never comes)."""
    for item in items:
        time.sleep(delay_s)
        yield item
    if then_block is not None:
        then_block.wait()


def test_the_guard_passes_items_through_in_order_and_ends_with_them():
    assert list(stall_guarded(iter(range(5)), timeout_s=5, what="train")) == [0, 1, 2, 3, 4]
    assert list(stall_guarded(iter([]), timeout_s=5, what="train")) == []


def test_an_error_of_the_stream_reaches_the_worker_as_itself():
    def failing():
        yield 1
        raise OSError("AWS Error NETWORK_CONNECTION")

    guarded = stall_guarded(failing(), timeout_s=5, what="train")
    assert next(guarded) == 1
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        next(guarded)


def test_a_stream_that_stops_delivering_fails_within_the_timeout():
    never = threading.Event()
    guarded = stall_guarded(_slow([1, 2], 0.05, then_block=never), timeout_s=0.5, what="train")
    assert [next(guarded), next(guarded)] == [1, 2]
    began = time.monotonic()
    with pytest.raises(DataStalled, match=r"no train batch arrived for 0.5 s"):
        next(guarded)
    assert time.monotonic() - began < 3
    never.set()


def test_a_slow_training_step_never_trips_the_guard():
    seen = []
    for item in stall_guarded(_slow(range(3), 0.05), timeout_s=0.3, what="train"):
        time.sleep(0.6)  # the consumer's own work: twice the timeout per item
        seen.append(item)
    assert seen == [0, 1, 2]


def test_a_run_whose_workers_cannot_be_placed_again_says_so_and_how_to_resume():
    from ray.train import ControllerError

    from rxray.train.loop import WORKER_GROUP_START_ATTEMPTS, failure_message

    startup = TimeoutError("The worker group startup timed out after 60.0 seconds waiting for 2 workers.\nmore")
    message = failure_message(ControllerError(startup), "pretraining", max_failures=2)
    assert message == (f"pretraining failed: its workers could not be started again after "
                       f"{WORKER_GROUP_START_ATTEMPTS} attempts (The worker group startup timed out after 60.0 "
                       f"seconds waiting for 2 workers.); the same command resumes from the last checkpoint once "
                       f"the cluster has room")
    assert failure_message(RuntimeError("boom\ntrace"), "fine-tuning", 2) == ("fine-tuning failed after up to 2 "
                                                                               "restarts: boom")


def test_a_long_epoch_prints_progress_with_an_eta():
    from rxray.train.epoch_log import EpochProgress

    now = [0.0]
    progress = EpochProgress("pretrain", epoch=0, epochs=2, total_steps=100, every_s=30.0, clock=lambda: now[0])
    now[0] = 10.0
    assert progress.update(5, 640) is None  # not due yet
    now[0] = 40.0
    assert progress.update(20, 2560) == "pretrain: epoch 1/2: 20/100 steps, 64 images/s, ETA 160 s"
    now[0] = 50.0
    assert progress.update(25, 3200) is None  # 10 s after the last line
    unknown = EpochProgress("finetune", epoch=1, epochs=3, total_steps=None, every_s=1.0, clock=lambda: now[0])
    now[0] = 52.0
    assert unknown.update(4, 64) == "finetune: epoch 2/3: 4 steps, 32 images/s"


def test_object_reads_from_many_threads_survive_a_store_that_fails_a_tenth_of_its_requests(s3_bucket, s3_proxy):
    """pyarrow's own retries let some 5xx answers through when threads share a client; storage.with_retries not."""
    from concurrent.futures import ThreadPoolExecutor

    from rxray import storage

    blobs = {f"object-{i}": bytes([i]) * 2000 for i in range(60)}
    for name, blob in blobs.items():
        storage.write_bytes(f"{s3_bucket}/{name}", blob)
    fs, root = storage.pyarrow_filesystem(s3_bucket)

    def read(name: str) -> bytes:
        with fs.open_input_stream(f"{root}/{name}") as handle:
            return handle.read()

    names = list(blobs) * 20  # the old client let reads through only past a few hundred requests
    with s3_proxy.flaky(failure_rate=0.1, delay_rate=0.0) as faults, ThreadPoolExecutor(8) as pool:
        read_back = list(pool.map(lambda name: storage.with_retries(lambda: read(name)), names))
    assert faults["503"] + faults["500"] + faults["reset"] > 20, faults
    assert read_back == [blobs[name] for name in names]
    with pytest.raises(FileNotFoundError):  # a missing object is not transient: no retries, no delay
        storage.with_retries(lambda: read("no-such-object"))


@pytest.mark.parametrize("message, transient", [
    ("When reading information for key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) during HeadObject "
     "operation: No response body.", True),
    ("AWS Error UNKNOWN (HTTP status 500) during HeadObject operation: No response body.", True),
    ("AWS Error INTERNAL_FAILURE during GetObject operation: ", True),
    ("AWS Error SERVICE_UNAVAILABLE during GetObject operation: ", True),
    ("AWS Error ACCESS_DENIED during GetObject operation: Access Denied", False),
    ("AWS Error UNKNOWN (HTTP status 403) during HeadObject operation: No response body.", False),
])
def test_only_server_errors_throttling_and_dropped_connections_are_retried(message, transient):
    from rxray import storage

    assert storage.is_transient(OSError(message)) is transient
