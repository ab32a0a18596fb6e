import numpy as np
import pytest
import tensorflow as tf

from mnist_keras.data import pipeline as data_lib
from mnist_keras.data.pipeline import DataError
from tests.helpers import idx_bytes, make_folder, need_module


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_folder_round_trip(tmp_path, compress):
    arrays, _ = make_folder(tmp_path, compress=compress)
    x_train, y_train, x_test, y_test = data_lib.load_local(tmp_path)
    np.testing.assert_array_equal(x_train, arrays["x_train"])
    np.testing.assert_array_equal(y_test, arrays["y_test"])
    assert x_train.dtype == np.uint8 and x_train.shape == (20, 28, 28)


def test_load_npz(tmp_path):
    arrays, _ = make_folder(tmp_path / "idx")
    np.savez(tmp_path / "mnist.npz", **{k: v.astype(np.uint8) for k, v in arrays.items()})
    for where in (tmp_path, tmp_path / "mnist.npz"):
        x_train, _, _, y_test = data_lib.load_local(where)
        np.testing.assert_array_equal(x_train, arrays["x_train"])
        np.testing.assert_array_equal(y_test, arrays["y_test"])


def test_npz_missing_array(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"mnist.npz: missing arrays y_train"):
        data_lib.load_local(tmp_path)


def test_wrong_magic(tmp_path):
    good = idx_bytes(np.zeros((20, 28, 28)))
    _, paths = make_folder(tmp_path, overrides={"x_train": b"\x00\x00\x09\x03" + good[4:]})
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: wrong magic number 0x00000903"):
        data_lib.load_local(tmp_path)


def test_truncated_payload(tmp_path):
    good = idx_bytes(np.zeros((20, 28, 28)))
    make_folder(tmp_path, overrides={"x_test": good[:-100]})
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte.gz: truncated payload"):
        data_lib.load_local(tmp_path)


def test_truncated_header(tmp_path):
    make_folder(tmp_path, overrides={"y_train": b"\x00\x00\x08\x01\x00"})
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: truncated IDX header"):
        data_lib.load_local(tmp_path)


def test_trailing_bytes(tmp_path):
    make_folder(tmp_path, overrides={"y_test": idx_bytes(np.zeros(10)) + b"\x00\x00"})
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: 2 unexpected bytes"):
        data_lib.load_local(tmp_path)


def test_dimension_mismatch(tmp_path):
    make_folder(tmp_path, overrides={"x_train": np.zeros((20, 32, 32))})
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: images must have shape \(N, 28, 28\)"):
        data_lib.load_local(tmp_path)


def test_count_mismatch(tmp_path):
    make_folder(tmp_path, overrides={"y_train": np.zeros(19)})
    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte.gz: 19 labels but "
                                        r"train-images-idx3-ubyte.gz has 20 images"):
        data_lib.load_local(tmp_path)


def test_label_out_of_range(tmp_path):
    labels = np.zeros(10)
    labels[7] = 12
    make_folder(tmp_path, overrides={"y_test": labels})
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte.gz: label 12 at index 7 is outside 0-9"):
        data_lib.load_local(tmp_path)


def test_missing_files_and_folder(tmp_path):
    with pytest.raises(DataError, match="missing train-images-idx3-ubyte"):
        data_lib.load_local(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        data_lib.load_local(tmp_path / "nowhere")


def test_not_gzip(tmp_path):
    make_folder(tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: cannot read"):
        data_lib.load_local(tmp_path)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    make_folder(tmp_path, train=30)
    monkeypatch.setenv(data_lib.DATA_DIR_ENV, str(tmp_path))
    data = data_lib.load_mnist(validation_size=10)
    assert (len(data.x_train), len(data.x_val), len(data.x_test)) == (20, 10, 10)
    assert data.source == str(tmp_path)


def test_keras_download_failure_says_how_to_fix(monkeypatch):
    import keras

    def offline():
        raise Exception("URL fetch failure on https://storage.googleapis.com/mnist.npz: None -- unreachable")

    monkeypatch.delenv(data_lib.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(keras.datasets.mnist, "load_data", offline)
    with pytest.raises(DataError, match=r"could not download MNIST .*--data-dir or MNIST_DATA_DIR"):
        data_lib.load_mnist()


def test_tfds_source_with_mock_data():
    tfds = need_module("tensorflow_datasets", "pip install -e \".[tfds]\"")

    with tfds.testing.mock_data(num_examples=40):
        data = data_lib.load_mnist("tfds", validation_size=8)
    assert data.x_train.shape == (32, 28, 28) and data.x_train.dtype == np.uint8
    assert data.x_test.shape == (40, 28, 28)
    assert data.y_train.max() < 10


def test_tfds_missing_copy_is_one_line(tmp_path, monkeypatch):
    tfds = need_module("tensorflow_datasets", "pip install -e \".[tfds]\"")

    def missing(*args, **kwargs):
        raise tfds.core.registered.DatasetNotFoundError("mnist")  # what an offline, empty data_dir gives

    monkeypatch.setattr(tfds, "load", missing)
    with pytest.raises(DataError, match=f"tensorflow-datasets could not load mnist from {tmp_path}"):
        data_lib.load_mnist("tfds", str(tmp_path))


def test_validation_split_is_seeded_and_disjoint():
    x = np.arange(100, dtype=np.uint8)[:, None, None].repeat(28, 1).repeat(28, 2)
    y = (np.arange(100) % 10).astype(np.uint8)
    a = data_lib.split_validation(x, y, x[:5], y[:5], validation_size=20, seed=3)
    b = data_lib.split_validation(x, y, x[:5], y[:5], validation_size=20, seed=3)
    c = data_lib.split_validation(x, y, x[:5], y[:5], validation_size=20, seed=4)
    train_ids, val_ids = set(a.x_train[:, 0, 0]), set(a.x_val[:, 0, 0])
    assert len(train_ids) == 80 and len(val_ids) == 20 and not train_ids & val_ids
    np.testing.assert_array_equal(a.x_val, b.x_val)
    assert set(c.x_val[:, 0, 0]) != val_ids


class FakeContext:
    """Stands in for tf.distribute.InputContext."""

    def __init__(self, pipelines=1, pipeline_id=0, replicas=1):
        self.num_input_pipelines, self.input_pipeline_id, self.num_replicas_in_sync = pipelines, pipeline_id, replicas

    def get_per_replica_batch_size(self, global_batch_size):
        return global_batch_size // self.num_replicas_in_sync


def labelled(count):
    images = (np.arange(count) % 256).astype(np.uint8)[:, None, None].repeat(28, 1).repeat(28, 2)
    return images, np.arange(count, dtype=np.uint8) % 10


def test_train_pipeline_batches_shuffles_and_repeats_per_epoch():
    images, labels = labelled(100)
    make = lambda seed: list(data_lib.train_dataset_fn(images, labels, 32, seed, epochs=2)(FakeContext()))
    batches = make(seed=5)
    assert len(batches) == 2 * 3  # 100 // 32 full batches per epoch, two epochs
    x, y = batches[0]
    assert x.shape == (32, 28, 28) and x.dtype == tf.float32 and y.dtype == tf.int32
    ids = [b[0].numpy()[:, 0, 0].astype(int) for b in batches]
    assert len(set(np.concatenate(ids[:3]))) == 96  # no repeats within an epoch
    assert not np.array_equal(ids[0], ids[3])  # reshuffled for the second epoch
    assert all(np.array_equal(a, b[0].numpy()[:, 0, 0]) for a, b in zip(ids, make(seed=5)))
    assert not np.array_equal(ids[0], make(seed=6)[0][0].numpy()[:, 0, 0])


def test_resumed_pipeline_sees_the_same_epoch():
    images, labels = labelled(64)
    full = list(data_lib.train_dataset_fn(images, labels, 16, 1, epochs=3)(FakeContext()))
    resumed = list(data_lib.train_dataset_fn(images, labels, 16, 1, epochs=3, initial_epoch=2)(FakeContext()))
    assert len(resumed) == 4
    for a, b in zip(full[8:], resumed):
        np.testing.assert_array_equal(a[0], b[0])


def test_train_pipeline_shards_per_worker_and_batches_per_replica():
    images, labels = labelled(100)
    seen = []
    for worker in range(2):
        context = FakeContext(pipelines=2, pipeline_id=worker, replicas=4)  # 2 workers x 2 replicas
        batches = list(data_lib.train_dataset_fn(images, labels, 20, 0, epochs=1)(context))
        assert len(batches) == 5 * 2  # 100 // 20 steps, 2 local replicas per step
        assert all(b[0].shape[0] == 5 for b in batches)
        seen.append(set(np.concatenate([b[0].numpy()[:, 0, 0] for b in batches]).astype(int)))
    assert not seen[0] & seen[1]


def test_eval_pipeline_pads_with_zero_weights():
    images, labels = labelled(10)
    batches = list(data_lib.eval_dataset_fn(images, labels, 4)(FakeContext()))
    assert len(batches) == 3
    weights = np.concatenate([b[2].numpy() for b in batches])
    np.testing.assert_array_equal(weights, [1] * 10 + [0] * 2)
    np.testing.assert_array_equal(np.concatenate([b[1].numpy() for b in batches])[:10], labels)


def test_pipelines_do_not_autotune():
    # An autotuned iterator's destructor waits for the autotuning thread to wake up,
    # which held up the end of real runs by 14-28 s (see data.PIPELINE_PARALLELISM).
    images, labels = labelled(10)
    for dataset in (data_lib.train_dataset_fn(images, labels, 4, 1, epochs=1)(FakeContext()),
                    data_lib.eval_dataset_fn(images, labels, 4)(FakeContext())):
        assert dataset.options().autotune.enabled is False


def test_batch_larger_than_data_is_an_error():
    with pytest.raises(DataError, match="--batch-size 64 is larger than the 10 training images"):
        data_lib.steps_per_epoch(10, 64)


def test_synthetic_data_is_deterministic():
    a, b = data_lib.synthetic_mnist(seed=3), data_lib.synthetic_mnist(seed=3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    assert a.x_train.shape == (512, 28, 28) and len(a.x_val) == 128


AUGMENTED = data_lib.Augmentation(shift_pixels=2, rotation_degrees=15.0, scale_range=0.15)


def test_resumed_pipeline_draws_the_same_augmentation():
    images, labels = labelled(64)
    images = np.repeat(np.linspace(0, 255, 28 * 28).reshape(1, 28, 28), 64, axis=0).astype(np.uint8)
    make = lambda initial_epoch: list(data_lib.train_dataset_fn(
        images, labels, 16, 1, epochs=3, initial_epoch=initial_epoch, augmentation=AUGMENTED)(FakeContext()))
    full, resumed = make(0), make(2)
    assert len(resumed) == 4
    for a, b in zip(full[8:], resumed):
        np.testing.assert_array_equal(a[0], b[0])
    # Every image is changed, each its own way, and the epochs differ.
    assert not np.array_equal(full[0][0][0], full[0][0][1])
    assert not np.array_equal(full[0][0], full[4][0])


def test_random_affine_rotates_scales_and_shifts_within_its_ranges():
    images = np.zeros((32, 28, 28), np.float32)
    images[:, 8:20, 13:15] = 255.0  # a vertical bar through the centre
    seed = tf.constant([3, 4], tf.int64)
    still = data_lib.random_affine(tf.constant(images), data_lib.Augmentation(rotation_degrees=1e-6), seed)
    np.testing.assert_allclose(still.numpy(), images, atol=1e-3)  # no change: the identity map
    moved = data_lib.random_affine(tf.constant(images), AUGMENTED, seed).numpy()
    np.testing.assert_array_equal(moved, data_lib.random_affine(tf.constant(images), AUGMENTED, seed).numpy())
    assert len({image.tobytes() for image in moved}) == 32  # per image, not per batch
    # The bar keeps its ink (scaled by at most 1.15^2 either way) and stays near the centre.
    ink = moved.sum(axis=(1, 2)) / images[0].sum()
    assert ((ink > 1 / 1.15**2 - 0.05) & (ink < 1.15**2 + 0.05)).all()
    rows, columns = np.nonzero(moved.max(axis=0) > 0)
    assert rows.min() >= 8 - 4 and rows.max() <= 19 + 4 and columns.min() >= 13 - 6 and columns.max() <= 14 + 6


def test_shift_only_augmentation_stays_whole_pixel():
    images = np.zeros((8, 28, 28), np.float32)
    images[:, 14, 14] = 255.0
    seed = tf.constant([1, 7], tf.int64)
    shifted = data_lib.augment(tf.constant(images), data_lib.Augmentation(shift_pixels=2), seed).numpy()
    np.testing.assert_array_equal(shifted, data_lib.random_shift(tf.constant(images), 2, seed).numpy())
    assert set(np.unique(shifted)) <= {0.0, 255.0}
