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

    from rxray.train.launch import WORKER_GROUP_START_ATTEMPTS, failure_message

    startup = TimeoutError("The worker group startup timed out after 60.0 seconds waiting for 2 workers.\nmore")
    message = failure_message(ControllerError(startup), "pretraining", max_failures=2)
    assert message == (f"pretraining failed: its workers could not be started again after "
                       f"{WORKER_GROUP_START_ATTEMPTS} attempts (The worker group startup timed out after 60.0 "
                       f"seconds waiting for 2 workers.); the same command resumes from the last checkpoint once "
                       f"the cluster has room")
    assert failure_message(RuntimeError("boom\ntrace"), "fine-tuning", 2) == ("fine-tuning failed after up to 2 "
                                                                               "restarts: boom")


def test_a_stall_the_restarts_cannot_cure_ends_in_one_line_naming_it():
    from ray.train import WorkerGroupError

    from rxray.train.launch import failure_message

    remote = RuntimeError("ray::RayTrainWorker.run_train_fn() (pid=1, ip=10.0.0.2)\n  File \"worker.py\", line 80\n"
                          "rxray.train.worker.DataStalled: no train batch arrived for 120 s (a lost node's data)")
    error = WorkerGroupError("Worker 1 failed:\n(traceback)", {1: remote, 0: RuntimeError("peer gone")})
    alone = WorkerGroupError("", {1: remote})
    assert failure_message(error, "pretraining", 2) == failure_message(alone, "pretraining", 2)
    assert failure_message(WorkerGroupError("", {2: RuntimeError("x"), 0: RuntimeError("peer gone\n")}), "p", 1) == (
        "p failed after up to 1 restarts: worker 0: peer gone")
    assert failure_message(error, "pretraining", 2) == (
        "pretraining failed after up to 2 restarts: worker 1: rxray.train.worker.DataStalled: no train batch "
        "arrived for 120 s (a lost node's data)")


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


def test_transient_store_errors_are_retried_and_others_are_not(monkeypatch):
    """pyarrow's S3 client passes some 5xx answers on when threads share it (8 threads x 1,200 reads through the
    10%-failing proxy: 55 failed reads); storage.with_retries tries those again, with backoff, and nothing else."""
    from rxray import storage

    monkeypatch.setattr(storage, "RETRY_BACKOFF_S", 0.001)
    answers = [OSError("When reading information for key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 503) "
                       "during HeadObject operation: No response body."),
               OSError("AWS Error INTERNAL_FAILURE during GetObject operation: "), b"the object"]

    def flaky_read() -> bytes:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert storage.with_retries(flaky_read) == b"the object" and not answers
    calls = []

    def missing() -> bytes:
        calls.append(1)
        raise FileNotFoundError("no such key")

    with pytest.raises(FileNotFoundError):
        storage.with_retries(missing)
    assert len(calls) == 1  # a missing object is not transient: no retries

    def always_down() -> bytes:
        calls.append(1)
        raise OSError("AWS Error SERVICE_UNAVAILABLE during GetObject operation: ")

    calls.clear()
    with pytest.raises(OSError, match="SERVICE_UNAVAILABLE"):
        storage.with_retries(always_down)
    assert len(calls) == storage.S3_MAX_ATTEMPTS


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


def test_a_long_wait_is_told_while_it_lasts():
    never = threading.Event()
    said: list[str] = []
    guarded = stall_guarded(_slow([1], 0.01, then_block=never), timeout_s=1.0, what="train", say=said.append,
                            say_every_s=0.3)
    assert next(guarded) == 1
    with pytest.raises(DataStalled):
        next(guarded)
    never.set()
    assert 2 <= len(said) <= 3 and all("for the next train batch" in line and "at 1 s" in line for line in said)


@pytest.mark.parametrize("workers", [2, 3, 4, 5, 8])
def test_workers_holding_every_one_cpu_node_leave_room_for_the_input_tasks(workers):
    from rxray.train.launch import INPUT_TASK_CPUS, cpus_per_worker

    share = cpus_per_worker(float(workers), workers, gpu=False)  # one worker per 1-CPU node, no spare node
    assert 1.0 - share >= INPUT_TASK_CPUS and share >= 0.25
    assert cpus_per_worker(float(workers + 1), workers, gpu=False) == 1.0  # a spare CPU: whole-CPU workers
