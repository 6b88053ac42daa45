"""Tests for data/mm.py: Moving MNIST generation, MNIST files, test sets, custom arrays.

They read synthetic digits in the real IDX format (conftest's mnist_root); the tests
marked real_data read the real files in $MNIST_ROOT. Nothing touches the internet:
downloads are served from 127.0.0.1.
"""

import functools
import gzip
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from data import arrays, mm
from helpers import said

REPO = Path(__file__).resolve().parents[1]

# A folder with only the test file falls back to splitting it, and warns; that is tested
# once below and is noise everywhere else.
pytestmark = pytest.mark.filterwarnings("ignore:train-images-idx3-ubyte.gz is not in")


@pytest.fixture(scope="module")
def pools(mnist_root):
    return mm.digit_pools(mnist_root, download=False)


def make_dataset(digits, is_train=True, length=32, **kw):
    return mm.MovingMNIST(None, is_train, 10, 10, [2], length=length, digits=digits, **kw)


def as_bytes(dataset, epoch=None):
    """Each sequence of the dataset, inputs and targets together, as bytes."""
    if epoch is not None:
        dataset.set_epoch(epoch)
    return [torch.cat(dataset[i]).numpy().tobytes() for i in range(len(dataset))]


# -----------------------------------------------------------------------------
# 1. generation follows Srivastava et al. 2015

def test_trajectory_stays_inside_and_reflects_at_borders():
    rng = np.random.default_rng(0)
    step = 0.1
    hits = 0
    for _ in range(200):
        pos = mm.random_trajectory(rng, 50, step)  # (T, 2)
        assert pos.shape == (50, 2)
        assert pos.min() >= 0 and pos.max() <= 1
        d = np.diff(pos, axis=0)  # displacement into each frame
        at_border = (pos[1:-1] == 0) | (pos[1:-1] == 1)
        flipped = np.sign(d[1:]) != np.sign(d[:-1])
        # A velocity component flips exactly at the frames that touch a border...
        np.testing.assert_array_equal(flipped, at_border)
        hits += at_border.sum()
        # ...and a step that ends off the borders is a full step_length.
        clamped = ((pos == 0) | (pos == 1)).any(1)  # (T,)
        np.testing.assert_allclose(np.linalg.norm(d, axis=1)[~clamped[1:]], step)
    assert hits > 100  # the trajectories did meet the borders


def test_render_places_digits_and_combines_by_max():
    rng = np.random.default_rng(1)
    digits = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8)
    pos = np.stack([mm.random_trajectory(rng, 20) for _ in range(2)])  # (K, T, 2)
    both = mm.render_sequence(digits, pos)
    one = mm.render_sequence(digits[:1], pos[:1])
    two = mm.render_sequence(digits[1:], pos[1:])
    assert both.shape == (20, 64, 64) and both.dtype == np.uint8
    np.testing.assert_array_equal(both, np.maximum(one, two))
    for t in range(20):  # the single digit sits at the truncated scaled corner, alone
        top, left = (pos[0, t] * (64 - 28)).astype(int)
        expected = np.zeros((64, 64), np.uint8)
        expected[top:top + 28, left:left + 28] = digits[0]
        np.testing.assert_array_equal(one[t], expected)


@pytest.mark.parametrize("num_digits", [1, 2, 3])
def test_sequence_has_the_requested_digits(pools, num_digits):
    digits = pools[0]
    seq = mm.generate_sequence(np.random.default_rng(7), digits, 20, num_digits)
    # Redraw what generate_sequence draws, in its order, and compose by hand.
    rng = np.random.default_rng(7)
    chosen = digits[rng.integers(len(digits), size=num_digits)]
    expected = np.zeros((20, 64, 64), np.uint8)
    for digit in chosen:
        for t, (y, x) in enumerate(mm.random_trajectory(rng, 20, 0.1)):
            top, left = int(y * 36), int(x * 36)
            patch = expected[t, top:top + 28, left:left + 28]
            np.maximum(patch, digit, out=patch)
    np.testing.assert_array_equal(seq, expected)


def test_dataset_shapes_and_range(pools):
    ds = mm.MovingMNIST(None, True, 7, 5, [1, 2, 3], length=8, digits=pools[0])
    assert len(ds) == 8
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (7, 1, 64, 64) and y.shape == (5, 1, 64, 64)
        assert x.dtype == y.dtype == torch.float32
        assert 0 <= x.min() and x.max() <= 1 and x.max() > 0.9  # digits are drawn
    with pytest.raises(IndexError):
        ds[8]


# -----------------------------------------------------------------------------
# 2. determinism, epochs, workers

def test_samples_are_pure_functions_of_seed_epoch_index(pools):
    a, b = make_dataset(pools[0]), make_dataset(pools[0])
    np.random.seed(123)  # the global state must not matter
    for ds in (a, b):
        ds.set_epoch(3)
    assert as_bytes(a) == as_bytes(b)
    assert as_bytes(make_dataset(pools[0], seed=1))[0] != as_bytes(a)[0]


def test_dataloader_workers_and_epochs(pools):
    ds = make_dataset(pools[0], length=48)
    loader = DataLoader(ds, batch_size=4, shuffle=True, num_workers=2,
                        persistent_workers=False, generator=torch.Generator().manual_seed(0))

    def epoch_sequences(epoch):
        ds.set_epoch(epoch)
        seqs = [torch.cat([x, y], 1)[j].numpy().tobytes() for x, y in loader
                for j in range(len(x))]
        assert len(seqs) == 48
        return seqs

    e0, e1 = epoch_sequences(0), epoch_sequences(1)
    assert len(set(e0)) == 48  # no duplicates across workers
    assert set(e0) == set(as_bytes(ds, epoch=0))  # workers saw the epoch set here
    assert set(e1) == set(as_bytes(ds, epoch=1))
    assert not set(e0) & set(e1)  # fresh sequences each epoch


def test_epoch_index_keys_work_in_persistent_workers(pools):
    ds = make_dataset(pools[0], length=8)
    by_key = [torch.cat(ds[(3, i)]).numpy().tobytes() for i in range(8)]
    assert by_key == as_bytes(ds, epoch=3)  # dataset[(epoch, i)] is sequence i of that epoch
    ds.set_epoch(0)
    loader = DataLoader(ds, sampler=[(3, i) for i in range(8)], batch_size=4, num_workers=1,
                        persistent_workers=True)
    for _ in range(2):  # the same workers, twice
        seen = [torch.cat([x, y], 1)[j].numpy().tobytes() for x, y in loader for j in range(len(x))]
        assert seen == by_key


def test_heldout_set_is_fixed_across_epochs(pools):
    val = make_dataset(pools[1], is_train=False)
    first = as_bytes(val)
    val.set_epoch(5)
    assert as_bytes(val) == first
    # Same digits, seed and index, but training sequences come from another stream.
    assert not set(as_bytes(make_dataset(pools[1], is_train=True))) & set(first)


# -----------------------------------------------------------------------------
# 3. digit pools

def test_fallback_pools_are_disjoint_and_warn_once(mnist_root, tmp_path, monkeypatch):
    only_test = tmp_path / "only_test"
    only_test.mkdir()
    (only_test / mm.TEST_IMAGES).write_bytes((mnist_root / mm.TEST_IMAGES).read_bytes())
    monkeypatch.setattr(mm, "FALLBACK_SPLIT", 400)  # the fixture holds 500 test digits
    monkeypatch.setattr(mm, "_POOLS", {})
    monkeypatch.setattr(mm, "_FALLBACK_WARNED", False)
    with pytest.warns(UserWarning, match="can't be compared with published"):
        train, heldout = mm.digit_pools(only_test, download=False)
    test = mm.load_mnist(only_test / mm.TEST_IMAGES)
    np.testing.assert_array_equal(train, test[:400])
    np.testing.assert_array_equal(heldout, test[400:])

    monkeypatch.setattr(mm, "_POOLS", {})  # reload, but don't warn again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mm.digit_pools(only_test, download=False)
    assert mm.digit_pools(only_test, download=False)[0] is mm.digit_pools(
        only_test, download=False)[0]  # cached


def test_datasets_draw_from_their_pool(mnist_root, pools):
    train = mm.MovingMNIST(mnist_root, True, 10, 10, [2], download=False)
    val = mm.MovingMNIST(mnist_root, False, 10, 10, [2], download=False)
    assert train.digits is pools[0] and val.digits is pools[1]


def test_full_training_file_is_used_when_present(tmp_path, pools):
    train_digits = np.arange(3 * 28 * 28, dtype=np.uint8).reshape(3, 28, 28)
    write_idx(tmp_path / mm.TRAIN_IMAGES, train_digits)
    write_idx(tmp_path / mm.TEST_IMAGES, pools[1][:5])
    train, heldout = mm.digit_pools(tmp_path, download=False)
    np.testing.assert_array_equal(train, train_digits)
    np.testing.assert_array_equal(heldout, pools[1][:5])


def test_no_digits_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no MNIST digits in .*python -m data.mm download"):
        mm.digit_pools(tmp_path, download=False)


# -----------------------------------------------------------------------------
# 4. reading IDX files

def write_idx(path, images):
    n, rows, cols = images.shape
    header = np.array([mm.IDX_IMAGES_MAGIC, n, rows, cols], ">i4").tobytes()
    with gzip.open(path, "wb") as f:
        f.write(header + images.tobytes())


@pytest.mark.real_data
def test_reads_the_real_mnist_test_file(real_mnist_root):
    images = mm.load_mnist(real_mnist_root / mm.TEST_IMAGES)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert images.max() == 255 and 0.1 < images.mean() / 255 < 0.15  # MNIST ink ~13%


@pytest.mark.real_data
def test_the_real_file_passes_the_download_check(real_mnist_root, tmp_path, server):
    url, folder = server
    (folder / mm.TEST_IMAGES).write_bytes((real_mnist_root / mm.TEST_IMAGES).read_bytes())
    path = mm.download_file(mm.TEST_IMAGES, tmp_path, mm.MNIST_FILES[mm.TEST_IMAGES], [url],
                            timeout=5)
    assert path.read_bytes() == (real_mnist_root / mm.TEST_IMAGES).read_bytes()


def test_reads_raw_idx(tmp_path, pools):
    images = pools[1][:2]
    header = np.array([2051, 2, 28, 28], ">i4").tobytes()  # big-endian, as in IDX
    (tmp_path / "raw").write_bytes(header + images.tobytes())
    np.testing.assert_array_equal(mm.load_mnist(tmp_path / "raw"), images)


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[:len(b) // 2], "truncated or corrupt"),
    (lambda b: b[:500] + bytes(x ^ 0xFF for x in b[500:600]) + b[600:], "truncated or corrupt"),
    (lambda b: gzip.compress(gzip.decompress(b)[:-100], 1), f"holds {500 * 784 - 100}"),
    (lambda b: gzip.compress(b"\0\0\x08\x01" + gzip.decompress(b)[4:], 1), "magic number 2049"),
    (lambda b: b"\0\0\x08", "too short"),
])
def test_rejects_damaged_idx(tmp_path, mnist_root, damage, message):
    bad = tmp_path / mm.TEST_IMAGES
    bad.write_bytes(damage((mnist_root / mm.TEST_IMAGES).read_bytes()))
    with pytest.raises(ValueError, match=message) as e:
        mm.load_mnist(bad)
    assert str(bad) in str(e.value) and "delete it" in str(e.value)


# -----------------------------------------------------------------------------
# 5. downloads, served from 127.0.0.1

@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/served; yields (url, folder)."""
    folder = tmp_path / "served"
    folder.mkdir()

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/", folder
    httpd.shutdown()
    httpd.server_close()


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_good_file(tmp_path, server):
    url, folder = server
    payload = os.urandom(300_000)
    (folder / "x.bin").write_bytes(payload)
    md5 = hashlib.md5(payload).hexdigest()
    root = tmp_path / "root"
    # The first mirror is down; the second serves the file.
    path = mm.download_file("x.bin", root, md5, [closed_port_url(), url], timeout=5)
    assert path == root / "x.bin" and path.read_bytes() == payload
    assert os.listdir(root) == ["x.bin"]  # no temp file left
    (folder / "x.bin").unlink()  # already there with the right md5: no request made
    assert mm.download_file("x.bin", root, md5, [url], timeout=5) == path


def test_download_rejects_wrong_md5_and_leaves_nothing(tmp_path, server):
    url, folder = server
    (folder / "x.bin").write_bytes(b"corrupted" * 1000)
    root = tmp_path / "root"
    with pytest.raises(mm.UsageError, match=r"md5 .* expected 0123.*by hand.*x\.bin") as e:
        mm.download_file("x.bin", root, "0123456789abcdef0123456789abcdef", [url], timeout=5)
    assert url + "x.bin" in str(e.value) and "\n" not in str(e.value)
    assert os.listdir(root) == []


def test_download_unreachable_server_is_a_clear_error(tmp_path, server):
    url, _ = server
    root = tmp_path / "root"
    dead = closed_port_url()
    with pytest.raises(mm.UsageError, match="could not download x.bin") as e:
        mm.download_file("x.bin", root, "0" * 32, [dead, url], timeout=5)  # down; 404
    message = str(e.value)
    assert dead + "x.bin" in message and url + "x.bin" in message and "404" in message
    assert f"put it at {root / 'x.bin'}" in message
    assert os.listdir(root) == []


def test_download_cli_and_fallback_with_local_mirror(tmp_path, server, mnist_root, monkeypatch,
                                                    capsys):
    url, folder = server
    test_bytes = (mnist_root / mm.TEST_IMAGES).read_bytes()
    (folder / mm.TEST_IMAGES).write_bytes(test_bytes)
    monkeypatch.setattr(mm, "MNIST_MIRRORS", [url])  # serves the test file only
    monkeypatch.setitem(mm.MNIST_FILES, mm.TEST_IMAGES, hashlib.md5(test_bytes).hexdigest())
    monkeypatch.setattr(mm, "FALLBACK_SPLIT", 400)
    root = tmp_path / "root"
    assert mm.run_cli(mm.main, ["download", "--root", str(root)]) == 1
    err = said(capsys.readouterr().err)
    assert len(err) == 1 and err[0].startswith(f"error: could not download {mm.TRAIN_IMAGES}")
    assert f"could not download {mm.TEST_IMAGES}" not in err[0]
    assert sorted(os.listdir(root)) == [mm.TEST_IMAGES]  # fetched, md5 checked
    # The training file can't be had, so the pools fall back to the test digits.
    train, heldout = mm.digit_pools(root, download=True)
    np.testing.assert_array_equal(heldout, mm.load_mnist(root / mm.TEST_IMAGES)[400:])


# -----------------------------------------------------------------------------
# 6. fixed test sets

def test_make_test_set_round_trips_and_is_deterministic(tmp_path, mnist_root, pools):
    arr = mm.make_test_set(mnist_root, 6, download=False)
    assert arr.shape == (20, 6, 64, 64) and arr.dtype == np.uint8
    np.testing.assert_array_equal(arr, mm.make_test_set(mnist_root, 6, download=False))
    assert not np.array_equal(arr, mm.make_test_set(mnist_root, 6, seed=1, download=False))
    np.save(tmp_path / "t.npy", arr)
    np.testing.assert_array_equal(mm.load_test_set(tmp_path / "t.npy"), arr)
    # Test sequences are not validation sequences of the same seed.
    val = make_dataset(pools[1], is_train=False, length=6)
    first_val = (torch.cat(val[0]).squeeze(1) * 255).round().to(torch.uint8).numpy()
    assert first_val.shape == arr[:, 0].shape and not np.array_equal(first_val, arr[:, 0])


def test_make_test_set_draws_each_sequences_digit_count(mnist_root, pools):
    one = mm.make_test_set(mnist_root, 40, num_digits=[1], n_frames=2, download=False)
    three = mm.make_test_set(mnist_root, 40, num_digits=[3], n_frames=2, download=False)
    both = mm.make_test_set(mnist_root, 40, num_digits=[1, 3], n_frames=2, download=False)
    # One count draws nothing, so a plain count makes the very same set as before.
    np.testing.assert_array_equal(one, mm.make_test_set(mnist_root, 40, num_digits=1,
                                                        n_frames=2, download=False))
    counts = []
    for i in range(40):
        rng = mm._sample_rng(0, mm._STREAM_TEST, 0, 0, i)
        k = [1, 3][rng.integers(2)]
        expected = mm.generate_sequence(rng, pools[1], 2, k)
        np.testing.assert_array_equal(both[:, i], expected)
        counts.append(k)
    assert set(counts) == {1, 3}
    ink = lambda a: (a > 0).mean()
    assert ink(one) < ink(both) < ink(three)


@pytest.mark.slow
def test_make_test_set_cli(tmp_path, mnist_root):
    out = tmp_path / "sub" / "test.npy"
    result = subprocess.run(
        [sys.executable, "-m", "data.mm", "make-test-set", "--root", str(mnist_root),
         "--out", str(out), "--num", "3", "--seed", "4", "--no-download", "--num-digits", "1", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "(20, 3, 64, 64)" in result.stdout
    np.testing.assert_array_equal(mm.load_test_set(out), mm.make_test_set(
        mnist_root, 3, num_digits=[1, 2], seed=4, download=False))
    assert os.listdir(out.parent) == ["test.npy"]  # the temp file is gone


@pytest.mark.parametrize("array", [np.zeros((20, 3, 64), np.uint8),
                                   np.zeros((20, 3, 64, 64), np.float32)])
def test_load_test_set_rejects_wrong_arrays(tmp_path, array):
    np.save(tmp_path / "bad.npy", array)
    with pytest.raises(ValueError, match=r"bad\.npy: found .* expected uint8 \(T, N, H, W\)"):
        mm.load_test_set(tmp_path / "bad.npy")


def test_load_test_set_rejects_non_npy(tmp_path):
    (tmp_path / "bad.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="not a readable .npy"):
        mm.load_test_set(tmp_path / "bad.npy")


# -----------------------------------------------------------------------------
# 7. custom arrays

def test_custom_uint8_nthw(tmp_path):
    arr = np.random.default_rng(0).integers(0, 256, (5, 12, 16, 16), dtype=np.uint8)
    np.save(tmp_path / "s.npy", arr)
    seqs = arrays.load_sequences(tmp_path / "s.npy")
    assert seqs.shape == (5, 12, 1, 16, 16) and seqs.dtype == np.uint8
    train, val = arrays.split_holdout(len(seqs), 0.2)
    ds = arrays.SequenceArrayDataset(seqs, 4, 6, indices=val)
    assert len(ds) == 1
    x, y = ds[0]
    assert x.shape == (4, 1, 16, 16) and y.shape == (6, 1, 16, 16) and x.dtype == torch.float32
    torch.testing.assert_close(x[:, 0], torch.from_numpy(arr[4, :4]).float() / 255)
    torch.testing.assert_close(y[:, 0], torch.from_numpy(arr[4, 4:10]).float() / 255)


def test_custom_float_ntchw_npz_and_tnhw(tmp_path):
    arr = np.random.default_rng(0).random((3, 8, 2, 10, 10), dtype=np.float32)
    np.savez(tmp_path / "s.npz", sequences=arr, other=np.zeros(3))
    seqs = arrays.load_sequences(tmp_path / "s.npz")
    np.testing.assert_array_equal(seqs, arr)
    x, y = arrays.SequenceArrayDataset(seqs, 5, 3)[2]
    assert x.shape == (5, 2, 10, 10) and y.shape == (3, 2, 10, 10)
    torch.testing.assert_close(y, torch.from_numpy(arr[2, 5:]))

    tnhw = np.random.default_rng(1).integers(0, 256, (20, 4, 64, 64), dtype=np.uint8)
    seqs = arrays.load_sequences(tnhw, layout="TNHW")
    assert seqs.shape == (4, 20, 1, 64, 64)
    np.testing.assert_array_equal(seqs[3, 7, 0], tnhw[7, 3])


@pytest.mark.parametrize("array, layout, message", [
    (np.zeros((2, 5, 8, 8), np.int64), None, "dtype int64; expected uint8"),
    (np.full((2, 5, 8, 8), 2.0, np.float32), None, r"span \[2.0, 2.0\]; expected \[0, 1\]"),
    (np.full((2, 5, 8, 8), np.nan, np.float32), None, "expected"),
    (np.zeros((2, 5, 8), np.uint8), None, "layout NTHW needs 4"),
    (np.zeros((2, 5, 8, 8), np.uint8), "NTCHW", "layout NTCHW needs 5"),
    (np.zeros((2, 5, 8, 8), np.uint8), "NCHW", "unknown layout"),
])
def test_bad_custom_arrays_are_rejected(array, layout, message):
    with pytest.raises(ValueError, match=message):
        arrays.load_sequences(array, layout)


def test_bad_custom_files_and_lengths_are_rejected(tmp_path):
    np.savez(tmp_path / "two.npz", a=np.zeros((2, 5, 8, 8)), b=np.zeros(2))
    with pytest.raises(ValueError, match="name the sequences 'sequences'"):
        arrays.load_sequences(tmp_path / "two.npz")
    seqs = arrays.load_sequences(np.zeros((2, 5, 8, 8), np.uint8))
    with pytest.raises(ValueError, match="don't fit in sequences of 5 frames"):
        arrays.SequenceArrayDataset(seqs, 3, 3)
    with pytest.raises(ValueError, match="indices span"):
        arrays.SequenceArrayDataset(seqs, 2, 3, indices=[0, 2])


def test_split_holdout_takes_the_tail():
    train, val = arrays.split_holdout(10)
    assert train.tolist() == list(range(9)) and val.tolist() == [9]
    train, val = arrays.split_holdout(100, 0.25, min_holdout=30)
    assert len(val) == 30 and val[0] == 70 and len(train) == 70
    with pytest.raises(ValueError, match="leaves none to train on"):
        arrays.split_holdout(1)
