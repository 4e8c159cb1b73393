"""Where callers outside the training steps found the checkpoint functions; they now live in
:mod:`rxray.models.checkpoints` (models must not import train). Kept for the imports that still name this module."""

from rxray.models.checkpoints import (CHECKPOINT_FILE, CLASSIFIER_KEYS, ENCODER_KEYS, Checkpoint,  # noqa: F401
                                      checkpoint_dir_name, checkpoint_encoder, checkpoint_epoch, latest_checkpoint,
                                      load_checkpoint, load_encoder, newest_checkpoint_after, read_checkpoint,
                                      require_checkpoint, save_checkpoint_file)
