"""`scripts/train.py` with test-only hooks, each switched on by an environment variable (never a flag):

- WEIGHTS_DUMP_ENV: a folder where every worker dumps its final weights (`worker<i>.npz`);
- CRASH_AFTER_EPOCH_ENV: an epoch (1-based) after whose backup training dies as if killed;
- HANG_AFTER_EPOCH_ENV: an epoch after which the main thread hangs while the process stays alive
  (a deadlock: heartbeats still answered);
- SIGNAL_AT_ENV: `<worker>:<epoch>:<batch>:<signal>:<target>` - after the group of steps ending at
  `batch` (0-based) of `epoch` (1-based), worker `<worker>` sends `<signal>` (e.g. TERM, KILL) to
  itself (`self`) or to its parent, the launcher (`parent`); with ONCE_MARKER_ENV naming a file,
  only while that file does not exist (it is created first), so a restarted worker is not hit again.

The launcher's workers re-run the script that was run (see the cli's worker command), so
`--workers N` makes every worker hooked too. The file is named train.py so that its error lines
name the command as scripts/train.py's do.
"""

import os

WEIGHTS_DUMP_ENV = "_MNIST_KERAS_TEST_WEIGHTS_DIR"
CRASH_AFTER_EPOCH_ENV = "_MNIST_KERAS_TEST_CRASH_AFTER_EPOCH"
HANG_AFTER_EPOCH_ENV = "_MNIST_KERAS_TEST_HANG_AFTER_EPOCH"
SIGNAL_AT_ENV = "_MNIST_KERAS_TEST_SIGNAL_AT"
ONCE_MARKER_ENV = "_MNIST_KERAS_TEST_ONCE_MARKER"
CRASH_EXIT_STATUS = 17


def crash_or_hang(epoch: int, logs: dict) -> None:
    """A training callback: die or hang after the epoch the environment names."""
    crash_after, hang_after = os.environ.get(CRASH_AFTER_EPOCH_ENV), os.environ.get(HANG_AFTER_EPOCH_ENV)
    if crash_after and epoch + 1 == int(crash_after):
        os._exit(CRASH_EXIT_STATUS)  # like kill -9: no cleanup, no exception handling
    if hang_after and epoch + 1 == int(hang_after):
        import time

        time.sleep(10**6)


def signal_at_batch():
    """A Keras callback sending the signal SIGNAL_AT_ENV names, or None without it."""
    spec = os.environ.get(SIGNAL_AT_ENV)
    if not spec:
        return None
    import signal

    import keras

    from mnist_keras.training import strategy

    worker, epoch, batch, name, target = spec.split(":")
    if int(worker) != (strategy.tf_config_task_index() or 0):
        return None

    class SignalAtBatch(keras.callbacks.Callback):
        def on_epoch_begin(self, index, logs=None):
            self.epoch = index + 1

        def on_train_batch_end(self, index, logs=None):
            marker = os.environ.get(ONCE_MARKER_ENV)
            if (self.epoch, index) != (int(epoch), int(batch)) or (marker and os.path.exists(marker)):
                return
            if marker:
                open(marker, "w").close()
            os.kill(os.getpid() if target == "self" else os.getppid(), getattr(signal, f"SIG{name}"))

    return SignalAtBatch()


def dump_weights(model) -> None:
    folder = os.environ.get(WEIGHTS_DUMP_ENV)
    if folder:
        import numpy as np

        from mnist_keras.training import strategy

        os.makedirs(folder, exist_ok=True)
        np.savez(os.path.join(folder, f"worker{strategy.tf_config_task_index() or 0}.npz"), *model.get_weights())


def hook_training(train) -> None:
    """`train.run` with the crash-or-hang callback added, and the final weights dumped."""
    run = train.run

    def hooked_run(*args, callbacks=None, **kwargs):
        signaller = signal_at_batch()
        hooks = [crash_or_hang, *([signaller] if signaller is not None else [])]
        result = run(*args, callbacks=[*(callbacks or []), *hooks], **kwargs)
        dump_weights(result.model)
        return result

    train.run = hooked_run


def install() -> None:
    """Hook training once the command imports TensorFlow (a launcher that only starts workers never does)."""
    from mnist_keras import console

    import_tensorflow = console.import_tensorflow

    def import_tensorflow_then_hook():
        tf = import_tensorflow()
        from mnist_keras.training import train

        hook_training(train)
        return tf

    console.import_tensorflow = import_tensorflow_then_hook


if __name__ == "__main__":
    install()
    from mnist_keras.cli import train_main

    raise SystemExit(train_main())
