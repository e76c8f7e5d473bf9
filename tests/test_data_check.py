"""Tests of `capt data check` and `capt data prepare` over fakes broken on purpose.

Downloads in these tests read local archives through file:// URLs; nothing leaves the machine.
"""

import argparse
import dataclasses
import hashlib
import json
import shutil
import tarfile

import pytest

from capt_lib.data import check as check_module
from capt_lib.data.check import (
    FAKE_RECORD,
    add_data_parser,
    check_dataset,
    rejection_error,
    run_prepare_steps,
)
from capt_lib.data.fakes import make_fake_dataset
from capt_lib.data.manifest import PrepareStep, load_manifest


def kinds(report, severity="error"):
    return [issue.kind for issue in report.issues if issue.severity == severity]


def messages(report, kind):
    return [issue.message for issue in report.issues if issue.kind == kind]


def split_entries(dataset_dir, split_file):
    return json.loads((dataset_dir / split_file).read_text(encoding="utf-8"))


def rewrite_split(dataset_dir, split_file, entries):
    (dataset_dir / split_file).write_text(json.dumps(entries), encoding="utf-8")


def parse(argv):
    parser = argparse.ArgumentParser(prog="capt")
    add_data_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_clean_fake_passes_full_check(tmp_path):
    make_fake_dataset("caltech101", tmp_path, num_classes=5, images_per_class=2)

    report = check_dataset("caltech101", tmp_path)

    assert report.ok
    assert kinds(report) == []
    assert kinds(report, "warning") == []
    assert report.fake
    assert dict(report.counts) == {"train": 10, "val": 10, "test": 10}
    assert report.format().endswith("result: OK")


def test_missing_image_named(tmp_path):
    dataset_dir = make_fake_dataset("eurosat", tmp_path, images_per_class=2)
    missing = split_entries(dataset_dir, "split_zhou_EuroSAT.json")["test"][3][0]
    (dataset_dir / "2750" / missing).unlink()

    report = check_dataset("eurosat", tmp_path, full=False)

    assert kinds(report) == ["missing_image"]
    message = messages(report, "missing_image")[0]
    assert f"2750/{missing}" in message
    assert "1 of 20 images listed for split 'test'" in message
    assert isinstance(rejection_error(report), FileNotFoundError)


def test_unreadable_image_named(tmp_path):
    dataset_dir = make_fake_dataset("eurosat", tmp_path, images_per_class=2)
    broken = split_entries(dataset_dir, "split_zhou_EuroSAT.json")["val"][5][0]
    (dataset_dir / "2750" / broken).write_bytes(b"this is not a JPEG")

    full = check_dataset("eurosat", tmp_path, full=True)
    fast = check_dataset("eurosat", tmp_path, full=False)

    assert kinds(full) == ["unreadable_image"]
    assert f"2750/{broken}" in messages(full, "unreadable_image")[0]
    assert "1 of 60 images" in messages(full, "unreadable_image")[0]
    assert fast.ok
    assert isinstance(rejection_error(full), ValueError)


def test_doubly_nested_folder_says_move_up(tmp_path):
    dataset_dir = make_fake_dataset("caltech101", tmp_path, num_classes=4, images_per_class=1)
    inner = tmp_path / "inner"
    dataset_dir.rename(inner)
    dataset_dir.mkdir()
    inner.rename(dataset_dir / "caltech-101")

    report = check_dataset("caltech101", tmp_path)

    assert kinds(report) == ["nested_folder"]
    message = messages(report, "nested_folder")[0]
    assert f"move the contents of {dataset_dir / 'caltech-101'} up one level" in message
    assert "101_ObjectCategories" in message


def test_nested_image_folder_says_move_up(tmp_path):
    dataset_dir = make_fake_dataset("eurosat", tmp_path, num_classes=3, images_per_class=1)
    (dataset_dir / "2750").rename(dataset_dir / "unpacked")
    (dataset_dir / "2750").mkdir()
    (dataset_dir / "unpacked").rename(dataset_dir / "2750" / "2750")

    report = check_dataset("eurosat", tmp_path)

    assert kinds(report) == ["nested_folder"]
    assert f"move the contents of {dataset_dir / '2750' / '2750'} up one level" in messages(report, "nested_folder")[0]


def test_root_pointing_at_dataset_folder(tmp_path):
    dataset_dir = make_fake_dataset("dtd", tmp_path, num_classes=3, images_per_class=1)

    report = check_dataset("dtd", dataset_dir)

    assert kinds(report) == ["wrong_root"]
    assert f"pass its parent {tmp_path}" in messages(report, "wrong_root")[0]


def test_misnamed_dataset_folder(tmp_path):
    dataset_dir = make_fake_dataset("food101", tmp_path, num_classes=3, images_per_class=1)
    dataset_dir.rename(tmp_path / "Food101")

    report = check_dataset("food101", tmp_path)

    assert kinds(report) == ["misnamed_folder"]
    assert "rename it to food-101/" in messages(report, "misnamed_folder")[0]


def test_flat_imagenet_val(tmp_path):
    dataset_dir = make_fake_dataset("imagenet", tmp_path, num_classes=3, images_per_class=2)
    val = dataset_dir / "images" / "val"
    for image in list(val.rglob("*.JPEG")):
        image.rename(val / image.name)
    for folder in [path for path in val.iterdir() if path.is_dir()]:
        folder.rmdir()

    report = check_dataset("imagenet", tmp_path, splits=["val", "test"])

    assert kinds(report) == ["flat_imagenet_val"]
    assert "holds 6 images directly" in messages(report, "flat_imagenet_val")[0]
    assert "one folder per WNID" in messages(report, "flat_imagenet_val")[0]


def test_missing_split_file_says_where_published(tmp_path):
    dataset_dir = make_fake_dataset("oxford_pets", tmp_path, num_classes=3, images_per_class=1)
    (dataset_dir / "split_zhou_OxfordPets.json").unlink()

    report = check_dataset("oxford_pets", tmp_path)

    assert kinds(report) == ["missing_split_file"]
    message = messages(report, "missing_split_file")[0]
    assert "1501r8Ber4nNKvmlFVQZ8SeUHTcdTTEqs" in message
    assert "huggingface.co/zhengli97/prompt_learning_dataset" in message


def test_split_file_inside_image_folder(tmp_path):
    dataset_dir = make_fake_dataset("eurosat", tmp_path, num_classes=3, images_per_class=1)
    (dataset_dir / "split_zhou_EuroSAT.json").rename(dataset_dir / "2750" / "split_zhou_EuroSAT.json")

    report = check_dataset("eurosat", tmp_path)

    assert kinds(report) == ["missing_file"]
    assert f"move it up into {dataset_dir}" in messages(report, "missing_file")[0]


def test_wrong_class_count_against_manifest(tmp_path):
    dataset_dir = make_fake_dataset("eurosat", tmp_path, images_per_class=1)
    (dataset_dir / FAKE_RECORD).unlink()
    entries = split_entries(dataset_dir, "split_zhou_EuroSAT.json")
    rewrite_split(dataset_dir, "split_zhou_EuroSAT.json",
                  {split: [entry for entry in items if entry[1] != 9] for split, items in entries.items()})
    shutil.rmtree(dataset_dir / "2750" / "SeaLake")

    report = check_dataset("eurosat", tmp_path, full=False)

    assert "class_count" in kinds(report)
    assert "found 9 classes, expected 10" in messages(report, "class_count")[0]
    assert not report.fake


def test_wrong_class_count_against_fake_record(tmp_path):
    dataset_dir = make_fake_dataset("dtd", tmp_path, num_classes=4, images_per_class=1)
    record = json.loads((dataset_dir / FAKE_RECORD).read_text())
    record["num_classes"] = 5
    (dataset_dir / FAKE_RECORD).write_text(json.dumps(record))

    report = check_dataset("dtd", tmp_path, full=False)

    assert kinds(report) == ["class_count"]
    assert FAKE_RECORD in messages(report, "class_count")[0]


def test_unconfirmed_count_is_warning(tmp_path):
    dataset_dir = make_fake_dataset("caltech101", tmp_path, images_per_class=1)
    (dataset_dir / FAKE_RECORD).unlink()

    report = check_dataset("caltech101", tmp_path, full=False)

    severities = {issue.message.split("'")[1]: issue.severity for issue in report.issues if issue.kind == "split_count"}
    assert severities == {"train": "error", "val": "error", "test": "warning"}
    assert "unconfirmed" in [issue for issue in report.issues if issue.severity == "warning"][0].message
    assert "class_count" not in kinds(report)


def test_unrenamed_caltech_name_is_mismatch(tmp_path):
    dataset_dir = make_fake_dataset("caltech101", tmp_path, num_classes=4, images_per_class=1)
    entries = split_entries(dataset_dir, "split_zhou_Caltech101.json")
    for items in entries.values():
        for entry in items:
            if entry[2] == "airplane":
                entry[2] = "airplanes"
    rewrite_split(dataset_dir, "split_zhou_Caltech101.json", entries)

    report = check_dataset("caltech101", tmp_path, full=False)

    assert kinds(report) == ["classname_mismatch"]
    assert "label 3 is 'airplanes', expected 'airplane'" in messages(report, "classname_mismatch")[0]


def test_swapped_boundary_names_reported(tmp_path):
    dataset_dir = make_fake_dataset("sun397", tmp_path, images_per_class=1)
    lines = (dataset_dir / "ClassName.txt").read_text().splitlines()
    lines[198], lines[199] = lines[199], lines[198]
    (dataset_dir / "ClassName.txt").write_text("\n".join(lines) + "\n")
    entries = split_entries(dataset_dir, "split_zhou_SUN397.json")
    swapped_names = {198: "outdoor ice_skating_rink", 199: "indoor ice_skating_rink"}
    for items in entries.values():
        for entry in items:
            entry[2] = swapped_names.get(entry[1], entry[2])
    rewrite_split(dataset_dir, "split_zhou_SUN397.json", entries)

    report = check_dataset("sun397", tmp_path, full=False)

    found = messages(report, "classname_mismatch")
    assert len(found) == 2
    assert "label 198 is 'outdoor ice_skating_rink'" in found[0]
    assert "'indoor ice_skating_rink'" in found[0]


def test_label_with_two_names(tmp_path):
    dataset_dir = make_fake_dataset("food101", tmp_path, num_classes=3, images_per_class=1)
    entries = split_entries(dataset_dir, "split_zhou_Food101.json")
    entries["test"][0][2] = "apple_tart"
    rewrite_split(dataset_dir, "split_zhou_Food101.json", entries)

    report = check_dataset("food101", tmp_path, full=False)

    assert "label_name_conflict" in kinds(report)
    assert "apple_tart" in messages(report, "label_name_conflict")[0]


def test_imagenet_extra_and_missing_wnids(tmp_path):
    dataset_dir = make_fake_dataset("imagenet", tmp_path, num_classes=3, images_per_class=1)
    (dataset_dir / "images" / "train" / "n09999999").mkdir()
    first_val = sorted((dataset_dir / "images" / "val").iterdir())[0]
    shutil.rmtree(first_val)

    report = check_dataset("imagenet", tmp_path, full=False)

    found = messages(report, "wnid_mismatch")
    assert any("n09999999" in message for message in found)
    assert any(first_val.name in message and "lacks" in message for message in found)


def test_imagenet_classnames_out_of_order(tmp_path):
    dataset_dir = make_fake_dataset("imagenet", tmp_path, num_classes=3, images_per_class=1)
    path = dataset_dir / "classnames.txt"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[1], lines[0], lines[2]]) + "\n")

    report = check_dataset("imagenet", tmp_path, full=False)

    assert kinds(report) == ["wnid_mismatch"]
    assert "sorted WNID order" in messages(report, "wnid_mismatch")[0]


def test_imagenetv2_extra_numeric_folder(tmp_path):
    dataset_dir = make_fake_dataset("imagenetv2", tmp_path, num_classes=3, images_per_class=1)
    (dataset_dir / "imagenetv2-matched-frequency-format-val" / "3").mkdir()

    report = check_dataset("imagenetv2", tmp_path, full=False)

    assert kinds(report) == ["wnid_mismatch"]
    assert "['3']" in messages(report, "wnid_mismatch")[0]


def test_imagenet_a_readme_is_skipped(tmp_path):
    dataset_dir = make_fake_dataset("imagenet_a", tmp_path, num_classes=3, images_per_class=1)

    report = check_dataset("imagenet_a", tmp_path)

    assert (dataset_dir / "imagenet-a" / "README.txt").is_file()
    assert report.ok
    assert len(report.classnames) == 3


def test_cli_check_exit_codes(tmp_path, capsys):
    make_fake_dataset("dtd", tmp_path / "good", num_classes=3, images_per_class=1)
    broken = make_fake_dataset("dtd", tmp_path / "bad", num_classes=3, images_per_class=1)
    (broken / "split_zhou_DescribableTextures.json").unlink()

    good_args = parse(["data", "check", "dtd", "--root", str(tmp_path / "good")])
    bad_args = parse(["data", "check", "dtd", "--root", str(tmp_path / "bad"), "--fast"])

    assert good_args.handler(good_args) == 0
    assert "result: OK" in capsys.readouterr().out
    assert bad_args.handler(bad_args) == 1
    assert "missing_split_file" in capsys.readouterr().out


def test_cli_check_all_skips_absent(tmp_path, capsys):
    make_fake_dataset("eurosat", tmp_path, num_classes=3, images_per_class=1)
    args = parse(["data", "check", "all", "--root", str(tmp_path), "--fast"])

    assert args.handler(args) == 0
    output = capsys.readouterr().out
    assert "capt data check eurosat:" in output
    assert "capt data check dtd: not prepared" in output


def test_cli_prepare_prints_manual_steps(tmp_path, capsys):
    args = parse(["data", "prepare", "caltech101", "--root", str(tmp_path)])

    assert args.handler(args) == 0
    output = capsys.readouterr().out
    assert "data.caltech.edu/records/mzrjq-6wc02" in output
    assert "1hyarUivQE36mY6jSomru6Fjd-JzwcCzN" in output
    assert not (tmp_path / "caltech-101").exists()


def test_cli_prepare_unscriptable_with_download_fails(tmp_path, capsys):
    args = parse(["data", "prepare", "stanford_cars", "--root", str(tmp_path), "--allow-download"])

    assert args.handler(args) == 1
    assert "cannot be fetched by a script" in capsys.readouterr().err


def make_fgvc_archive(tmp_path):
    """Pack a fake FGVC-Aircraft the way the official archive is laid out: fgvc-aircraft-2013b/data/..."""
    fake_dir = make_fake_dataset("fgvc_aircraft", tmp_path / "source", num_classes=3, images_per_class=1)
    archive = tmp_path / "fgvc-aircraft-2013b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(fake_dir, arcname="fgvc-aircraft-2013b/data")
    return archive


def test_cli_prepare_downloads_fgvc_from_file_url(tmp_path, capsys, monkeypatch):
    archive = make_fgvc_archive(tmp_path)
    manifest = load_manifest("fgvc_aircraft")
    step = dataclasses.replace(manifest.prepare_steps[0], url=archive.as_uri(), size=archive.stat().st_size)
    monkeypatch.setattr(check_module, "load_manifest", lambda name: dataclasses.replace(manifest, prepare_steps=(step,)))
    args = parse(["data", "prepare", "fgvc_aircraft", "--root", str(tmp_path / "data"), "--allow-download"])

    assert args.handler(args) == 0
    assert "result: OK" in capsys.readouterr().out
    assert (tmp_path / "data" / "fgvc_aircraft" / "variants.txt").is_file()
    assert not (tmp_path / "data" / "fgvc_aircraft" / "fgvc-aircraft-2013b.tar.gz").exists()


def test_prepare_rejects_wrong_size(tmp_path):
    archive = make_fgvc_archive(tmp_path)
    manifest = load_manifest("fgvc_aircraft")
    step = dataclasses.replace(manifest.prepare_steps[0], url=archive.as_uri(), size=archive.stat().st_size + 1)

    with pytest.raises(RuntimeError, match="incomplete or changed"):
        run_prepare_steps(dataclasses.replace(manifest, prepare_steps=(step,)), tmp_path / "data")

    assert not any((tmp_path / "data" / "fgvc_aircraft").iterdir())


def test_prepare_checks_sha256(tmp_path):
    archive = make_fgvc_archive(tmp_path)
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    manifest = load_manifest("fgvc_aircraft")
    good = dataclasses.replace(manifest.prepare_steps[0], url=archive.as_uri(), sha256=digest)
    bad = dataclasses.replace(good, sha256="0" * 64)

    with pytest.raises(RuntimeError, match="SHA-256"):
        run_prepare_steps(dataclasses.replace(manifest, prepare_steps=(bad,)), tmp_path / "bad")
    done = run_prepare_steps(dataclasses.replace(manifest, prepare_steps=(good,)), tmp_path / "good")

    assert len(done) == 1
    assert check_dataset("fgvc_aircraft", tmp_path / "good").ok


def test_prepare_names_missing_archive_member(tmp_path):
    archive = make_fgvc_archive(tmp_path)
    manifest = load_manifest("fgvc_aircraft")
    step = PrepareStep(url=archive.as_uri(), file="a.tar.gz", member="fgvc-aircraft-2013a/data", target=".")

    with pytest.raises(RuntimeError) as info:
        run_prepare_steps(dataclasses.replace(manifest, prepare_steps=(step,)), tmp_path / "data")

    assert "fgvc-aircraft-2013a/data" in str(info.value)
    assert "fgvc-aircraft-2013b" in str(info.value)
