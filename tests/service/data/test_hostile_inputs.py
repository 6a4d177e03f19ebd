"""Untrusted sources and shards: member names that leave the root, zip bombs, tars nested
without end, links out of the source, JPEGs of thousands of scans or cut short. Each is
skipped and counted where it is met (preparation, or the loader's corrupt count)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from service.data import build_train_loader
from service.data.jpeg import CorruptJpeg, check_jpeg_stream, decode_jpeg_rgb
from service.data.prepare import REFUSED_WHEN_READ, prepare_dataset
from service.data.sources import SourceLimits, safe_relative_path
from tests.service.data.conftest import config, image_bytes, storage
from tests.service.data.hostile import (
    cut_jpeg,
    many_scans_jpeg,
    nested_tar,
    write_unchecked_dataset,
)
from tests.service.data.test_prepare import read_everything

HOSTILE_NAMES = ["../evil.jpg", "cls_a/../../evil2.jpg", "C:\\evil3.jpg", "..\\..\\evil4.jpg", "cls_a/../cls_b/x.jpg"]


def write_archive(path: Path, members: dict[str, bytes]) -> Path:
    if path.suffix == ".zip":
        with zipfile.ZipFile(path, "w") as archive:
            for name, data in members.items():
                archive.writestr(name, data)
    else:
        with tarfile.open(path, "w") as archive:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
    return path


def shard_member_names(dest: Path) -> list[str]:
    names = []
    for shard in sorted(dest.glob("shard-*.tar")):
        with tarfile.open(shard) as tar:
            names += tar.getnames()
    return names


@pytest.mark.parametrize("suffix", [".tar", ".zip"])
def test_member_names_that_leave_the_root_are_skipped_counted_and_labels_stay_sane(tmp_path, suffix):
    members = {"cls_a/ok1.jpg": image_bytes(1), "cls_b/ok2.jpg": image_bytes(2),
               "/cls_a/abs.jpg": image_bytes(3), "./cls_b//dot.jpg": image_bytes(4)}
    members.update({name: image_bytes(10 + i) for i, name in enumerate(HOSTILE_NAMES)})
    src = write_archive(tmp_path / f"hostile{suffix}", members)
    manifest = prepare_dataset(str(src), str(tmp_path / "out"))

    assert manifest["class_names"] == ["cls_a", "cls_b"]
    assert manifest["extra"]["skipped"] == {"names that are unsafe (a '..' part, a drive letter)": 5}
    samples = read_everything(str(tmp_path / "out"))
    assert {key: label for key, (_, label) in samples.items()} == {
        "cls_a/ok1": 0, "cls_b/ok2": 1, "cls_a/abs": 0, "cls_b/dot": 1}
    for name in shard_member_names(tmp_path / "out"):
        # What an extracting tool would do with it: stays in the folder it extracts into.
        assert safe_relative_path(name) == name and not name.startswith("/") and "\\" not in name


def test_safe_relative_path_normalises_or_refuses():
    assert safe_relative_path("./a//b/./c.jpg") == "a/b/c.jpg"
    assert safe_relative_path("/abs/x.jpg") == "abs/x.jpg"
    assert safe_relative_path("a\\b.jpg") == "a/b.jpg"
    for bad in ("..", "../x.jpg", "a/../b.jpg", "C:x.jpg", "c:/x.jpg", "a/\0.jpg", "", "./"):
        assert safe_relative_path(bad) is None


def test_zip_bombs_and_oversized_members_are_skipped_with_a_bounded_read(tmp_path, caplog):
    members = {"cls/ok.jpg": image_bytes(1), "cls/bomb.jpg": b"\0" * (24 * 2**20),
               "cls/big.jpg": os.urandom(300_000)}
    src = tmp_path / "bomb.zip"
    with zipfile.ZipFile(src, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert src.stat().st_size < 400_000
    with caplog.at_level("WARNING", logger="service.data"):
        manifest = prepare_dataset(str(src), str(tmp_path / "out"),
                                   limits=SourceLimits(max_image_bytes=200_000))
    assert manifest["num_samples"] == 1 and manifest["shards"][0]["num_bytes"] < 100_000
    assert manifest["extra"]["skipped"] == {"files over 200000 bytes (max_image_bytes)": 2}
    assert "e.g. cls/bomb.jpg, cls/big.jpg" in caplog.text

    # The ratio bound catches a bomb under the size bound.
    manifest = prepare_dataset(str(src), str(tmp_path / "out2"))
    assert manifest["extra"]["skipped"] == {"members that expand over 100 times (max_expansion_ratio)": 1}
    assert set(read_everything(str(tmp_path / "out2"))) == {"ok", "big"}


def test_oversized_files_of_a_folder_and_a_tar_are_skipped(tmp_path):
    src = tmp_path / "photos"
    (src / "cls").mkdir(parents=True)
    (src / "cls" / "ok.jpg").write_bytes(image_bytes(1))
    (src / "cls" / "big.jpg").write_bytes(os.urandom(300_000))
    limits = SourceLimits(max_image_bytes=200_000)
    for source in (src, write_archive(tmp_path / "photos.tar", {"cls/ok.jpg": image_bytes(1),
                                                                 "cls/big.jpg": os.urandom(300_000)})):
        manifest = prepare_dataset(str(source), str(tmp_path / f"out-{source.name}"), limits=limits)
        assert manifest["num_samples"] == 1
        assert manifest["extra"]["skipped"] == {"files over 200000 bytes (max_image_bytes)": 1}


def test_tars_nested_beyond_the_bound_are_skipped_not_a_recursion_error(tmp_path):
    top = nested_tar(0, "cls/top.jpg")
    src = tmp_path / "nested.tar"
    src.write_bytes(top + nested_tar(1100, "x.jpg"))
    manifest = prepare_dataset(str(src), str(tmp_path / "out"))
    assert manifest["num_samples"] == 1
    assert manifest["extra"]["skipped"] == {"tars nested deeper than max_nesting": 1}
    # Within the bound a nested tar is read (as a class folder named after it).
    shallow = tmp_path / "shallow.tar"
    shallow.write_bytes(top + nested_tar(3, "x.jpg"))
    assert prepare_dataset(str(shallow), str(tmp_path / "out-shallow"))["num_samples"] == 2


def test_links_in_archives_and_hard_links_out_of_a_folder_are_skipped_and_counted(tmp_path):
    secret = tmp_path / "outside" / "passwd"
    secret.parent.mkdir()
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")

    tar_path = tmp_path / "links.tar"
    with tarfile.open(tar_path, "w") as tar:
        ok = image_bytes(1)
        info = tarfile.TarInfo("cls/ok.jpg")
        info.size = len(ok)
        tar.addfile(info, io.BytesIO(ok))
        for name, kind in (("cls/hard.jpg", tarfile.LNKTYPE), ("cls/soft.jpg", tarfile.SYMTYPE)):
            link = tarfile.TarInfo(name)
            link.type, link.linkname = kind, "/etc/passwd"
            tar.addfile(link)
    manifest = prepare_dataset(str(tar_path), str(tmp_path / "out-tar"))
    assert manifest["num_samples"] == 1
    assert manifest["extra"]["skipped"] == {"archive members that are links": 2}

    zip_path = tmp_path / "links.zip"
    with zipfile.ZipFile(zip_path, "w") as archive:
        archive.writestr("cls/ok.jpg", image_bytes(1))
        link = zipfile.ZipInfo("cls/soft.jpg")
        link.external_attr = (0o120777 << 16)
        archive.writestr(link, "/etc/passwd")
    manifest = prepare_dataset(str(zip_path), str(tmp_path / "out-zip"))
    assert manifest["num_samples"] == 1
    assert manifest["extra"]["skipped"] == {"archive members that are links": 1}

    folder = tmp_path / "photos" / "cls"
    folder.mkdir(parents=True)
    (folder / "ok.jpg").write_bytes(image_bytes(1))
    os.link(secret, folder / "passwd.jpg")
    (folder / "twin_a.jpg").write_bytes(image_bytes(2))
    os.link(folder / "twin_a.jpg", folder / "twin_b.jpg")  # both links inside: kept
    manifest = prepare_dataset(str(folder.parent), str(tmp_path / "out-folder"))
    assert manifest["extra"]["skipped"] == {"hard-linked files with links outside the source folder": 1}
    assert set(read_everything(str(tmp_path / "out-folder"))) == {"cls/ok", "cls/twin_a", "cls/twin_b"}


def test_jpegs_of_too_many_scans_or_cut_short_are_refused_when_prepared(tmp_path, caplog):
    src = tmp_path / "photos" / "cls"
    src.mkdir(parents=True)
    (src / "ok.jpg").write_bytes(image_bytes(1))
    (src / "scans.jpg").write_bytes(many_scans_jpeg(1000))
    (src / "cut.jpg").write_bytes(cut_jpeg())
    with caplog.at_level("WARNING", logger="service.data"):
        manifest = prepare_dataset(str(src.parent), str(tmp_path / "out"))
    assert set(read_everything(str(tmp_path / "out"))) == {"cls/ok"}
    assert manifest["extra"]["skipped"] == {REFUSED_WHEN_READ: 2} and manifest["extra"]["source_images"] == 3
    assert "skipped image 'cls/scans': a JPEG of 1000 scans, over the limit of 100" in caplog.text
    assert "skipped image 'cls/cut': a truncated JPEG" in caplog.text
    # Resuming finds the data set complete despite the refused images.
    assert prepare_dataset(str(src.parent), str(tmp_path / "out")) == manifest


def test_the_loader_counts_jpegs_of_too_many_scans_or_cut_short_as_corrupt(tmp_path):
    items = [(f"ok{i}", "jpg", image_bytes(i), 0) for i in range(5)]
    items += [("scans", "jpg", many_scans_jpeg(1000), 0), ("cut", "jpg", cut_jpeg(), 0),
              ("cut_with_end", "jpg", cut_jpeg(keep_end_marker=True), 0)]
    url = write_unchecked_dataset(tmp_path / "ds", items)
    loader = build_train_loader(storage=storage(), cfg=config(url=url, loader_workers=0), img_size=16,
                                batch_size=8, rank=0, world_size=1, seed=0, epoch=0)
    (batch,) = list(loader)
    assert loader.corrupt_samples == 3
    assert set(batch["keys"]) <= {f"ok{i}" for i in range(5)}


def test_scan_count_and_truncation_checks():
    check_jpeg_stream(image_bytes(1))  # baseline
    check_jpeg_stream(many_scans_jpeg(100))  # at the limit
    check_jpeg_stream(b"not a jpeg")  # left to the decoders
    with pytest.raises(CorruptJpeg, match="101 scans"):
        check_jpeg_stream(many_scans_jpeg(101))
    with pytest.raises(CorruptJpeg, match="truncated"):
        check_jpeg_stream(cut_jpeg())
    with pytest.raises(CorruptJpeg, match="truncated"):
        decode_jpeg_rgb(cut_jpeg(keep_end_marker=True))


def test_cli_takes_the_bounds_and_refuses_bad_ones_in_one_line(tmp_path):
    import subprocess
    import sys

    src = tmp_path / "photos" / "cls"
    src.mkdir(parents=True)
    (src / "ok.jpg").write_bytes(image_bytes(1))
    (src / "big.jpg").write_bytes(image_bytes(2, (400, 300)))
    script = str(Path(__file__).resolve().parents[3] / "jobs" / "prepare_data.py")
    done = subprocess.run([sys.executable, script, str(src.parent), str(tmp_path / "out"),
                           "--max-image-bytes", "20KB"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "1 images in" in done.stdout and "skipped 1 files over 20480 bytes" in done.stderr
    bad = subprocess.run([sys.executable, script, str(src.parent), str(tmp_path / "out2"),
                          "--max-expansion-ratio", "0.5"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "max_expansion_ratio" in bad.stderr and ">= 1" in bad.stderr
