"""Tests of the CoOp-format loaders and class-name rules, run over fakes written by capt_lib.data.fakes."""

import json
from pathlib import Path

import numpy as np
import pytest

from capt_lib.data.check import check_dataset
from capt_lib.data.coop_datasets import (
    cars_classname,
    load_coop_dataset,
    pets_classname,
    read_classnames_txt,
    read_split_file,
    sorted_folder_classnames,
    sun397_classname,
    ucf101_classname,
    val_shots,
)
from capt_lib.data.fakes import make_fake_dataset
from capt_lib.data.manifest import list_datasets, load_manifest
from capt_lib.data.splits import split_base_novel

GOLDEN = Path(__file__).parent / "golden_classnames"


# -- class-name rules --------------------------------------------------------------------------


def test_caltech_rule_drops_then_renames():
    rule = load_manifest("caltech101").class_names
    folders = ["yin_yang", "airplanes", "Motorbikes", "BACKGROUND_Google", "accordion", "Faces_easy", "Leopards", "Faces"]

    names = sorted_folder_classnames(folders, rule.ignored_folders, rule.renames)

    assert names == ["face", "leopard", "motorbike", "accordion", "airplane", "yin_yang"]


def test_eurosat_rule_gives_golden_names():
    rule = load_manifest("eurosat").class_names
    folders = ["SeaLake", "River", "Residential", "PermanentCrop", "Pasture",
               "Industrial", "Highway", "HerbaceousVegetation", "Forest", "AnnualCrop"]
    golden = (GOLDEN / "eurosat.txt").read_text(encoding="utf-8").splitlines()

    assert sorted_folder_classnames(folders, rule.ignored_folders, rule.renames) == golden


@pytest.mark.parametrize("action, name", [
    ("ApplyEyeMakeup", "Apply_Eye_Makeup"),
    ("YoYo", "Yo_Yo"),
    ("LongJump", "Long_Jump"),
    ("Lunges", "Lunges"),
])
def test_ucf101_name_splits_at_capitals(action, name):
    assert ucf101_classname(action) == name


@pytest.mark.parametrize("class_path, name", [
    ("/a/apartment_building/outdoor", "outdoor apartment_building"),
    ("/b/bakery/shop", "shop bakery"),
    ("/a/abbey", "abbey"),
    ("/i/ice_skating_rink/indoor", "indoor ice_skating_rink"),
])
def test_sun397_name_reverses_path(class_path, name):
    assert sun397_classname(class_path) == name


def test_cars_name_moves_year_to_front():
    assert cars_classname("AM General Hummer SUV 2000") == "2000 AM General Hummer SUV"
    assert cars_classname("FIAT 500 Abarth 2012") == "2012 FIAT 500 Abarth"


def test_pets_name_is_lowercased_stem():
    assert pets_classname("Abyssinian_122.jpg") == "abyssinian"
    assert pets_classname("images/american_pit_bull_terrier_10.jpg") == "american_pit_bull_terrier"


def test_read_classnames_txt_keeps_spaces(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_text("n01440764 tench\nn01443537 goldfish\n\nn01484850 great white shark\n", encoding="utf-8")

    names = read_classnames_txt(path)

    assert list(names.items()) == [
        ("n01440764", "tench"), ("n01443537", "goldfish"), ("n01484850", "great white shark"),
    ]


def test_read_classnames_txt_rejects_repeated_wnid(tmp_path):
    path = tmp_path / "classnames.txt"
    path.write_text("n01440764 tench\nn01440764 tench again\n", encoding="utf-8")

    with pytest.raises(ValueError, match="line 2"):
        read_classnames_txt(path)


def test_read_split_file_names_bad_entry(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": [["a.jpg", 0, "cat"], ["b.jpg", "1", "dog"]], "val": [], "test": []}))

    with pytest.raises(ValueError) as info:
        read_split_file(path)

    assert "train[1]" in str(info.value)
    assert "split.json" in str(info.value)


@pytest.mark.parametrize("shots, expected", [(1, 1), (2, 2), (4, 4), (8, 4), (16, 4), (0, 0), (-1, -1)])
def test_val_shots_caps_at_four(shots, expected):
    assert val_shots(shots) == expected


# -- loaders over fakes ---------------------------------------------------------------------


def test_caltech101_loader_labels_and_renames(tmp_path):
    make_fake_dataset("caltech101", tmp_path, num_classes=6, images_per_class=2)

    train = load_coop_dataset("caltech101", tmp_path, "train")

    assert train.classnames[:4] == ("face", "leopard", "motorbike", "airplane")
    assert "BACKGROUND_Google" not in train.classnames
    assert not any("Faces_easy" in path for path in train.paths)
    assert len(train) == 12
    faces = [label for label, path in zip(train.labels, train.paths) if "/Faces/" in path]
    assert faces == [0, 0]


def test_caltech101_full_fake_boundary(tmp_path):
    make_fake_dataset("caltech101", tmp_path, images_per_class=1)
    train = load_coop_dataset("caltech101", tmp_path, "train")
    test = load_coop_dataset("caltech101", tmp_path, "test")

    base_train, base_test = split_base_novel(train, test, part="base")
    novel_train, = split_base_novel(train, part="novel")

    assert train.num_classes == 100
    assert base_train.classnames[-1] == "helicopter"
    assert novel_train.classnames[0] == "ibis"
    assert len(base_test) == 50


def test_eurosat_loader_gives_golden_names(tmp_path):
    make_fake_dataset("eurosat", tmp_path, images_per_class=3)
    golden = tuple((GOLDEN / "eurosat.txt").read_text(encoding="utf-8").splitlines())

    for split in ("train", "val", "test"):
        dataset = load_coop_dataset("eurosat", tmp_path, split)
        assert dataset.classnames == golden
        assert len(dataset) == 30
        assert np.array_equal(np.bincount(dataset.labels), np.full(10, 3))


def test_eurosat_folder_matches_label(tmp_path):
    make_fake_dataset("eurosat", tmp_path, images_per_class=1)

    dataset = load_coop_dataset("eurosat", tmp_path, "train")

    folders = [Path(path).parent.name for path in dataset.paths]
    assert folders[list(dataset.labels).index(9)] == "SeaLake"
    assert folders[list(dataset.labels).index(0)] == "AnnualCrop"


def test_ucf101_loader_names(tmp_path):
    make_fake_dataset("ucf101", tmp_path, images_per_class=1)

    dataset = load_coop_dataset("ucf101", tmp_path, "test")

    assert dataset.classnames[0] == "Apply_Eye_Makeup"
    assert dataset.classnames[50] == "Long_Jump"
    assert dataset.classnames[51] == "Lunges"
    assert dataset.classnames[100] == "Yo_Yo"


def test_sun397_loader_names_and_paths(tmp_path):
    make_fake_dataset("sun397", tmp_path, num_classes=4, images_per_class=1)

    dataset = load_coop_dataset("sun397", tmp_path, "train")

    assert dataset.classnames[:3] == ("abbey", "outdoor apartment_building", "shop bakery")
    assert "/SUN397/a/apartment_building/outdoor/" in dataset.paths[1]
    assert list(dataset.labels) == [0, 1, 2, 3]


def test_stanford_cars_paths_relative_to_folder(tmp_path):
    make_fake_dataset("stanford_cars", tmp_path, num_classes=3, images_per_class=2)

    train = load_coop_dataset("stanford_cars", tmp_path, "train")
    test = load_coop_dataset("stanford_cars", tmp_path, "test")

    assert train.classnames[0] == "2000 AM General Hummer SUV"
    assert all("/stanford_cars/cars_train/" in path for path in train.paths)
    assert all("/stanford_cars/cars_test/" in path for path in test.paths)


def test_fgvc_loader_reads_variant_lists(tmp_path):
    make_fake_dataset("fgvc_aircraft", tmp_path, num_classes=3, images_per_class=2)

    val = load_coop_dataset("fgvc_aircraft", tmp_path, "val")

    assert val.classnames == ("707-320", "F-16A/B", "Fake Jet 002")
    assert list(val.labels) == [0, 0, 1, 1, 2, 2]
    lines = (tmp_path / "fgvc_aircraft" / "images_variant_val.txt").read_text().splitlines()
    assert [Path(path).stem for path in val.paths] == [line.split(" ")[0] for line in lines]
    assert lines[2].endswith(" F-16A/B")


def test_fgvc_full_fake_keeps_boundary(tmp_path):
    make_fake_dataset("fgvc_aircraft", tmp_path, images_per_class=1)

    train = load_coop_dataset("fgvc_aircraft", tmp_path, "train")

    assert train.classnames[49] == "Cessna 525"
    assert train.classnames[50] == "Cessna 560"
    assert train.classnames[99] == "Yak-42"


def test_flowers_names_from_cat_to_name(tmp_path):
    make_fake_dataset("oxford_flowers", tmp_path, num_classes=3, images_per_class=1)
    cat_to_name = json.loads((tmp_path / "oxford_flowers" / "cat_to_name.json").read_text())

    dataset = load_coop_dataset("oxford_flowers", tmp_path, "test")

    assert dataset.classnames == (cat_to_name["1"], cat_to_name["2"], cat_to_name["3"])
    assert dataset.classnames[0] == "pink primrose"


def test_pets_names_lowercase_breed(tmp_path):
    make_fake_dataset("oxford_pets", tmp_path, num_classes=2, images_per_class=1)

    dataset = load_coop_dataset("oxford_pets", tmp_path, "train")

    assert dataset.classnames == ("abyssinian", "american_pit_bull_terrier")
    assert Path(dataset.paths[0]).name == "Abyssinian_1.jpg"


def test_food101_and_dtd_sorted_folders(tmp_path):
    make_fake_dataset("food101", tmp_path, num_classes=3, images_per_class=1)
    make_fake_dataset("dtd", tmp_path, num_classes=3, images_per_class=1)

    food = load_coop_dataset("food101", tmp_path, "train")
    dtd = load_coop_dataset("dtd", tmp_path, "train")

    assert food.classnames[:2] == ("apple_pie", "baby_back_ribs")
    assert dtd.classnames[:2] == ("banded", "blotchy")
    assert list(food.classnames) == sorted(food.classnames)


def test_imagenet_val_is_test(tmp_path):
    make_fake_dataset("imagenet", tmp_path, num_classes=3, images_per_class=2)

    train = load_coop_dataset("imagenet", tmp_path, "train")
    val = load_coop_dataset("imagenet", tmp_path, "val")
    test = load_coop_dataset("imagenet", tmp_path, "test")

    assert val.paths == test.paths
    assert all("/images/val/" in path for path in test.paths)
    assert all("/images/train/" in path for path in train.paths)
    assert train.classnames[0] == "tench"
    assert all(Path(path).parent.name == "n01440764" for path, label in zip(train.paths, train.labels) if label == 0)


def test_imagenet_full_fake_has_1000_classes(tmp_path):
    make_fake_dataset("imagenet", tmp_path, images_per_class=1)

    test = load_coop_dataset("imagenet", tmp_path, "test")

    assert test.num_classes == 1000
    assert len(test) == 1000
    assert np.array_equal(test.labels, np.arange(1000))


@pytest.mark.parametrize("name", ["imagenet_a", "imagenet_r"])
def test_imagenet_subsets_are_200_way(tmp_path, name):
    dataset_dir = make_fake_dataset(name, tmp_path, images_per_class=1)
    lines = (dataset_dir / "classnames.txt").read_text(encoding="utf-8").splitlines()
    present = sorted(path.name for path in (dataset_dir / load_manifest(name).image_dir).iterdir() if path.is_dir())
    name_of = dict(line.split(" ", 1) for line in lines)

    dataset = load_coop_dataset(name, tmp_path, "test")

    assert len(lines) == 1000
    assert dataset.num_classes == 200
    assert dataset.classnames == tuple(name_of[wnid] for wnid in present)
    assert np.array_equal(np.unique(dataset.labels), np.arange(200))


def test_imagenetv2_folder_number_is_label(tmp_path):
    dataset_dir = make_fake_dataset("imagenetv2", tmp_path, num_classes=12, images_per_class=1)
    names = [line.split(" ", 1)[1] for line in (dataset_dir / "classnames.txt").read_text().splitlines()]

    dataset = load_coop_dataset("imagenetv2", tmp_path, "test")

    folder_of = {label: Path(path).parent.name for label, path in zip(dataset.labels, dataset.paths)}
    assert folder_of[10] == "10"
    assert folder_of[2] == "2"
    assert dataset.classnames[10] == names[10]
    assert list(dataset.labels) == list(range(12))  # 9 comes before 10, unlike a string sort


def test_variant_rejects_train_split(tmp_path):
    with pytest.raises(ValueError) as info:
        load_coop_dataset("imagenet_sketch", tmp_path, "train")

    assert "['test']" in str(info.value)


def test_loader_images_open(tmp_path):
    make_fake_dataset("dtd", tmp_path, num_classes=2, images_per_class=1)

    dataset = load_coop_dataset("dtd", tmp_path, "val")

    assert dataset.load_image(0).size == (16, 16)
    assert dataset.load_image(0).mode == "RGB"


def test_loader_rejects_with_check_message(tmp_path):
    dataset_dir = make_fake_dataset("dtd", tmp_path, num_classes=3, images_per_class=1)
    first = json.loads((dataset_dir / "split_zhou_DescribableTextures.json").read_text())["val"][0][0]
    (dataset_dir / "images" / first).unlink()

    with pytest.raises(FileNotFoundError) as info:
        load_coop_dataset("dtd", tmp_path, "val")

    assert str(info.value) == check_dataset("dtd", tmp_path, full=False, splits=["val"]).format()
    assert first in str(info.value)


def test_loader_rejects_wrong_class_count_as_value_error(tmp_path):
    dataset_dir = make_fake_dataset("dtd", tmp_path, num_classes=3, images_per_class=1)
    record = json.loads((dataset_dir / "CAPT_FAKE_DATASET.json").read_text())
    record["num_classes"] = 4
    (dataset_dir / "CAPT_FAKE_DATASET.json").write_text(json.dumps(record))

    with pytest.raises(ValueError, match="found 3 classes, expected 4"):
        load_coop_dataset("dtd", tmp_path, "train")


def test_loader_warns_on_unconfirmed_count(tmp_path):
    dataset_dir = make_fake_dataset("ucf101", tmp_path, images_per_class=1)
    record = json.loads((dataset_dir / "CAPT_FAKE_DATASET.json").read_text())
    (dataset_dir / "CAPT_FAKE_DATASET.json").unlink()
    assert record["counts"]["test"] == 101

    with pytest.warns(UserWarning, match="split 'test' has 101 images, expected 3,783"):
        test = load_coop_dataset("ucf101", tmp_path, "test")

    assert len(test) == 101


def test_loader_missing_root_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_coop_dataset("eurosat", tmp_path / "nowhere", "train")


@pytest.mark.parametrize("name", sorted(list_datasets()))
def test_every_fake_loads_every_split(tmp_path, name):
    make_fake_dataset(name, tmp_path, num_classes=3, images_per_class=2)
    manifest = load_manifest(name)

    for split in manifest.splits:
        dataset = load_coop_dataset(name, tmp_path, split)
        assert dataset.num_classes == 3, split
        assert len(dataset) == 6, split
        assert np.array_equal(np.bincount(dataset.labels), [2, 2, 2]), split
        assert all(Path(path).is_file() for path in dataset.paths), split
