"""Datasets, transforms, seeded augmentation, sharding and skip-on-error loading (swin.data)."""
from __future__ import annotations

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from swin import data as D


def write_folder(root: Path, classes=("cat", "dog"), per_class: int = 4, size: int = 40,
                 splits=("train", "val")) -> Path:
    g = torch.Generator().manual_seed(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(root / split / c / f"{i}.png")
    return root


def test_digits_split_is_fixed_stratified_and_upsampled():
    train, val, classes = D.load_digits(32)
    assert (len(train), len(val)) == (1437, 360) and classes == [str(i) for i in range(10)]
    x, y = train.load(0)
    assert x.shape == (3, 32, 32) and x.dtype == torch.uint8 and 0 <= y < 10
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # grey as 3 channels
    train2, val2, _ = D.load_digits(32)
    assert torch.equal(train.images, train2.images) and torch.equal(val.labels, val2.labels)
    counts = torch.bincount(val.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: ~36 per digit
    assert D.load_digits(48)[0].images.shape[-1] == 48


def test_image_folder_scan_and_every_bad_layout(tmp_path):
    root = write_folder(tmp_path / "ds")
    s = D.build_splits(str(root), 32)
    assert s.classes == ["cat", "dog"] and len(s.train) == 8 and len(s.val) == 8
    with pytest.raises(FileNotFoundError, match="does not exist"):
        D.build_splits(str(tmp_path / "nope"), 32)
    with pytest.raises(FileNotFoundError, match="no val/ folder"):
        D.build_splits(str(write_folder(tmp_path / "noval", splits=("train",))), 32)
    (root / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="empty has no images"):
        D.build_splits(str(root), 32)
    (root / "train" / "empty").rmdir()
    (root / "val" / "bird").mkdir()
    Image.new("RGB", (8, 8)).save(root / "val" / "bird" / "a.png")
    with pytest.raises(ValueError, match="bird"):
        D.build_splits(str(root), 32)


def test_unreadable_image_is_skipped_not_fatal(tmp_path):
    root = write_folder(tmp_path / "ds", per_class=2)
    bad = root / "train" / "cat" / "zz_corrupt.png"
    bad.write_bytes(b"this is not a png")
    s = D.build_splits(str(root), 32)
    ds = D.Transformed(s.train, D.eval_transform(32, D.IMAGENET_MEAN, D.IMAGENET_STD))
    items = [ds[i] for i in range(len(ds))]
    assert sum(p is not None for _, _, p in items) == 1
    x, y, skipped = D.collate_skip(items)
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 1, 1]
    assert skipped == [str(bad)] and skipped[0].reason.startswith("UnidentifiedImageError: ")  # the path, and why
    assert D.describe_skip(skipped[0]) == f"{bad} ({skipped[0].reason})" and str(bad) not in skipped[0].reason
    again = pickle.loads(pickle.dumps(skipped[0]))  # from a DataLoader worker
    assert again == str(bad) and again.reason == skipped[0].reason


def test_mix_seeds_differ_for_every_step_rank_and_micro_batch():
    seeds = {D.mix_seed(0, step, rank, micro) for step in range(3) for rank in range(8) for micro in range(64)}
    assert len(seeds) == 3 * 8 * 64  # e.g. rank 0's micro-batch 31 and rank 1's 0 (were the same seed)


def test_augmentation_is_a_function_of_seed_epoch_index():
    train, _, _ = D.load_digits(32)
    tf = D.train_transform(32, D.DIGITS_MEAN, D.DIGITS_STD, crop_scale=(0.3, 1.0), rand_augment=9, reprob=0.5)
    ds = D.Transformed(train, tf, seed=3)
    state = torch.get_rng_state()
    a = [ds[i][0] for i in (5, 6, 7)]
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is untouched
    torch.manual_seed(123)
    b = [ds[i][0] for i in (7, 6, 5)][::-1]  # other order, other global state: same images
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], a[0])
    assert a[0].shape == (3, 32, 32) and a[0].dtype == torch.float32


def test_shard_sampler_ranks_make_the_global_batch():
    one = D.ShardSampler(103, 1, 0, seed=1)
    two = [D.ShardSampler(103, 2, r, seed=1) for r in range(2)]
    for s in (one, *two):
        s.set_epoch(4)
    full, parts = one.indices(), [s.indices() for s in two]
    b = 8  # per-rank batch; the global batch is 16
    for i in range(len(parts[0]) // b):
        assert sorted(parts[0][i * b:(i + 1) * b] + parts[1][i * b:(i + 1) * b]) == sorted(full[i * 16:(i + 1) * 16])
    two[0].set_epoch(4, start=10)
    assert list(two[0]) == parts[0][10:] and len(two[0]) == len(parts[0]) - 10
    one.set_epoch(5)
    assert one.indices() != full


def test_eval_transform_resize_crop_and_mix():
    im = Image.new("RGB", (300, 200), (255, 0, 0))
    x = D.eval_transform(224, D.IMAGENET_MEAN, D.IMAGENET_STD, 0.875)(im)
    assert x.shape == (3, 224, 224)
    assert torch.allclose(x[0], torch.full((224, 224), (1 - 0.485) / 0.229), atol=1e-3)
    with pytest.raises(ValueError, match="eval_crop"):
        D.eval_transform(224, D.IMAGENET_MEAN, D.IMAGENET_STD, 1.5)
    mix = D.batch_mix(10, mixup=0.8, cutmix=1.0, switch_prob=0.5)
    xb, yb = mix(torch.rand(6, 3, 16, 16), torch.arange(6))
    assert yb.shape == (6, 10) and torch.allclose(yb.sum(1), torch.ones(6))
    assert D.batch_mix(10, 0, 0, 0.5) is None


@pytest.mark.parametrize("size", [224, 256, 384])
def test_eval_transform_equals_timms(size):
    """The official eval protocol: resize the short side to floor(size / 0.875) (292 for 256, 438 for
    384: rounding gave 293 / 439, up to 226/255 off in a pixel), bicubic, centre crop."""
    timm_data = pytest.importorskip("timm.data")
    g = torch.Generator().manual_seed(size)
    im = Image.fromarray((torch.rand(331, 517, 3, generator=g) * 255).to(torch.uint8).numpy())
    ours = D.eval_transform(size, D.IMAGENET_MEAN, D.IMAGENET_STD, 0.875)(im)
    theirs = timm_data.create_transform(size, is_training=False, interpolation="bicubic", crop_pct=0.875,
                                        mean=D.IMAGENET_MEAN, std=D.IMAGENET_STD)(im)
    assert ours.shape == theirs.shape == (3, size, size)
    assert (ours - theirs).abs().max() <= 1.5 / 255 / min(D.IMAGENET_STD)  # one uint8 rounding step


def test_cifar_offline_is_one_clear_sentence(monkeypatch, tmp_path):
    import torchvision.datasets as tvd

    class Offline:
        def __init__(self, root, train=True, download=False):
            if download:
                raise urllib.error.URLError("no route to host")
            raise RuntimeError("Dataset not found or corrupted.")

    monkeypatch.setattr(tvd, "CIFAR10", Offline)
    with pytest.raises(FileNotFoundError, match=r"CIFAR-10 is not in .* could not be downloaded"):
        D.build_splits("cifar10", 32, tmp_path)


class _TimmDraws:
    """The random draws in the order and from the generators timm's RandAugment uses (numpy for
    the choice of operations, Python's `random` for the rest)."""

    def choices(self, n, k):
        import numpy as np

        return np.random.randint(0, n, size=k).tolist()  # = np.random.choice(ops, k, replace=True)

    def uniform(self):
        import random

        return random.random()

    def gauss(self, mean, std):
        import random

        return random.gauss(mean, std)


def test_rand_augment_equals_timms_rand_m9_mstd05_inc1():
    """The official recipe's augmentation: for the same draws, every output equals timm's."""
    import random

    import numpy as np

    pytest.importorskip("timm")
    from timm.data.auto_augment import rand_augment_transform

    from swin.augment import OPS, RandAugment

    fill = tuple(min(255, round(255 * m)) for m in D.IMAGENET_MEAN)
    ref = rand_augment_transform("rand-m9-mstd0.5-inc1", dict(translate_const=int(48 * 0.45), img_mean=fill,
                                                               interpolation=Image.BICUBIC))
    assert [op.name for op in ref.ops] == list(OPS)
    ours = RandAugment(magnitude=9, magnitude_std=0.5, fill=fill, interpolation=Image.BICUBIC, rng=_TimmDraws())
    g = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:48]
    img = Image.fromarray(np.stack([xx * 5, yy * 6, g.integers(0, 256, (40, 48))], -1).astype(np.uint8))
    changed = compared = 0
    for seed in range(300):
        random.seed(seed)
        np.random.seed(seed)
        try:
            a = np.asarray(ref(img))
        except ValueError:  # timm's Posterize at magnitude 10 asks Pillow >= 10 for 0 bits and fails
            continue
        random.seed(seed)
        np.random.seed(seed)
        b = np.asarray(ours(img))
        assert np.array_equal(a, b), seed
        compared += 1
        changed += not np.array_equal(b, np.asarray(img))
    assert compared > 280 and changed > 150  # ~75% of images get at least one operation
    # each operation alone (same draws of whether, how strong, which sign): the same PIL call as timm's
    for name, op in zip(OPS, ref.ops):
        for seed in range(6):
            random.seed(seed)
            try:
                a = np.asarray(op(img))
            except ValueError:
                continue
            random.seed(seed)
            assert np.array_equal(a, np.asarray(ours.apply(name, img))), (name, seed)
    # magnitude 10: posterize keeps 0 bits, a black image (what Pillow < 10 and TF return)
    strong = RandAugment(magnitude=10, magnitude_std=0, prob=1.0)
    assert np.asarray(strong.apply("PosterizeIncreasing", img)).max() == 0


def test_train_transform_runs_rand_augment_on_images_and_tensors():
    from swin.augment import RandAugment

    tf = D.train_transform(32, D.DIGITS_MEAN, D.DIGITS_STD, rand_augment=9, reprob=0.25)
    assert any(isinstance(t, RandAugment) for t in tf.transforms)
    im = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    for x in (im, torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous()):
        out = tf(x)
        assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    with pytest.raises(ValueError, match="magnitude"):
        RandAugment(magnitude=12)


def test_eval_at_384_resizes_the_whole_image_as_the_official_code():
    """crop 1.0 (the official 384 configs, TEST.CROP: False): Resize((384, 384)) of the whole image, its
    sides kept (a left-to-right ramp still starts near 0), equal to PIL's bicubic resize within rounding."""
    ramp = np.tile(np.linspace(0, 255, 500).round().astype(np.uint8), (300, 1))
    im = Image.fromarray(np.stack([ramp] * 3, -1))
    ours = D.eval_transform(384, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), D.default_eval_crop(384))(im)
    official = np.asarray(im.resize((384, 384), Image.BICUBIC), dtype=np.float32) / 255
    assert ours.shape == (3, 384, 384) and ours[0, :, 0].max() < 0.01 and ours[0, :, -1].min() > 0.99
    assert np.abs(ours.permute(1, 2, 0).numpy() - official).max() <= 2.5 / 255


def test_image_files_follow_linked_folders_once(tmp_path):
    """A class folder's linked subfolder is read (torchvision's ImageFolder follows links too); a link
    back up the tree is walked once, not forever; hidden entries stay out."""
    root = write_folder(tmp_path / "d", classes=("a",), per_class=2, splits=("train",))
    shared = write_folder(tmp_path / "s", classes=("more",), per_class=3, splits=("train",)) / "train" / "more"
    cls = root / "train" / "a"
    (cls / "linked").symlink_to(shared, target_is_directory=True)
    (cls / "loop").symlink_to(cls, target_is_directory=True)
    (cls / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(cls / ".hidden" / "x.png")
    files = D.image_files(cls)
    assert len(files) == 5 and sum(f.parent.name == "linked" for f in files) == 3
