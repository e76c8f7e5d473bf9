"""Tests of the dataset manifests in data_manifests/ and their schema validation."""

import math
from pathlib import Path

import pytest
import yaml

from capt_lib.data.manifest import MANIFEST_DIR, list_datasets, load_manifest
from capt_lib.prompts.templates import CUSTOM_TEMPLATES

GOLDEN = Path(__file__).parent / "golden_classnames"

# Published sizes, typed from the CoOp documentation and the CAPT split counts:
# name: (CoOp folder, classes, {split: images}).
PUBLISHED = {
    "imagenet": ("imagenet", 1000, {"train": 1_281_167, "val": 50_000, "test": 50_000}),
    "caltech101": ("caltech-101", 100, {"train": 4128, "val": 1649, "test": 2465}),
    "oxford_pets": ("oxford_pets", 37, {"train": 2944, "val": 736, "test": 3669}),
    "stanford_cars": ("stanford_cars", 196, {"train": 6509, "val": 1635, "test": 8041}),
    "oxford_flowers": ("oxford_flowers", 102, {"train": 4093, "val": 1633, "test": 2463}),
    "food101": ("food-101", 101, {"train": 50500, "val": 20200, "test": 30300}),
    "fgvc_aircraft": ("fgvc_aircraft", 100, {"train": 3334, "val": 3333, "test": 3333}),
    "sun397": ("sun397", 397, {"train": 15880, "val": 3970, "test": 19850}),
    "dtd": ("dtd", 47, {"train": 2820, "val": 1128, "test": 1692}),
    "eurosat": ("eurosat", 10, {"train": 13500, "val": 5400, "test": 8100}),
    "ucf101": ("ucf101", 101, {"train": 7639, "val": 1898, "test": 3783}),
    "imagenetv2": ("imagenetv2", 1000, {"test": 10000}),
    "imagenet_sketch": ("imagenet-sketch", 1000, {"test": 50889}),
    "imagenet_a": ("imagenet-adversarial", 200, {"test": 7500}),
    "imagenet_r": ("imagenet-rendition", 200, {"test": 30000}),
}


def read_boundaries():
    rows = {}
    for line in (GOLDEN / "base_novel_boundaries.txt").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, n_classes, last_base, first_novel = line.split("\t")
            rows[name] = (int(n_classes), last_base, first_novel)
    return rows


def write_variant(tmp_path, **changes):
    """Copy the DTD manifest into tmp_path with top-level fields changed (None deletes a field)."""
    raw = yaml.safe_load((MANIFEST_DIR / "dtd.yaml").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            raw.pop(key)
        else:
            raw[key] = value
    (tmp_path / "dtd.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    return tmp_path


def test_list_datasets_has_the_15_benchmarks():
    assert list_datasets() == sorted(PUBLISHED)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_manifest_sizes_match_published_table(name):
    folder, n_classes, counts = PUBLISHED[name]
    manifest = load_manifest(name)

    assert manifest.folder == folder
    assert manifest.num_classes == n_classes
    assert dict(manifest.counts) == counts
    assert manifest.splits == tuple(counts)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_manifest_template_matches_custom_templates(name):
    manifest = load_manifest(name)

    assert manifest.template == CUSTOM_TEMPLATES[manifest.coop_name]


def test_base_novel_boundaries_match_golden_list():
    boundaries = read_boundaries()

    assert len(boundaries) == 10
    for name, (n_classes, last_base, first_novel) in boundaries.items():
        manifest = load_manifest(name)
        assert manifest.num_classes == n_classes, name
        assert manifest.base_novel.num_base == math.ceil(n_classes / 2), name
        assert manifest.base_novel.last_base == last_base, name
        assert manifest.base_novel.first_novel == first_novel, name


def test_eurosat_known_names_match_golden_list():
    golden = (GOLDEN / "eurosat.txt").read_text(encoding="utf-8").splitlines()
    manifest = load_manifest("eurosat")

    assert [manifest.class_names.known[label] for label in range(10)] == golden
    assert [manifest.class_names.renames[folder] for folder in sorted(manifest.class_names.renames)] == golden


def test_caltech101_rules_drop_two_rename_four():
    rule = load_manifest("caltech101").class_names

    assert rule.rule == "sorted_folders"
    assert set(rule.ignored_folders) == {"BACKGROUND_Google", "Faces_easy"}
    assert dict(rule.renames) == {
        "airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike",
    }


def test_imagenet_variants_are_test_only():
    for name in ("imagenetv2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        manifest = load_manifest(name)
        assert manifest.splits == ("test",), name
        assert manifest.base_novel is None, name
        assert manifest.vocabulary_size == 1000, name


def test_imagenet_val_and_test_share_a_folder():
    manifest = load_manifest("imagenet")

    assert manifest.split_dirs == {"train": "train", "val": "val", "test": "val"}


def test_unconfirmed_counts_are_marked():
    assert not load_manifest("caltech101").is_confirmed("counts.test")
    assert load_manifest("caltech101").is_confirmed("counts.train")
    assert not load_manifest("ucf101").is_confirmed("counts.test")
    assert not load_manifest("imagenet_sketch").is_confirmed("counts.test")
    assert not load_manifest("imagenet_a").is_confirmed("counts.test")


def test_source_of_falls_back_to_parent_field():
    manifest = load_manifest("caltech101")

    assert manifest.source_of("counts.test") == manifest.sources["counts"]
    assert "caltech101.py" in manifest.source_of("class_names")


def test_every_split_json_dataset_names_its_drive_file():
    for name in list_datasets():
        manifest = load_manifest(name)
        if manifest.loader == "split_json":
            assert manifest.split_file.startswith("split_zhou_"), name
            assert len(manifest.split_source.google_drive_id) > 20, name
            assert manifest.split_file in manifest.required, name


def test_load_manifest_accepts_coop_name():
    assert load_manifest("OxfordFlowers").name == "oxford_flowers"
    assert load_manifest("DescribableTextures").name == "dtd"


def test_unknown_dataset_lists_valid_names():
    with pytest.raises(ValueError) as info:
        load_manifest("cifar10")

    assert "cifar10" in str(info.value)
    assert "caltech101" in str(info.value)


def test_missing_field_names_file_and_field(tmp_path):
    write_variant(tmp_path, counts=None)

    with pytest.raises(ValueError) as info:
        load_manifest("dtd", manifest_dir=tmp_path)

    assert "dtd.yaml" in str(info.value)
    assert "counts" in str(info.value)


def test_unknown_field_is_rejected(tmp_path):
    write_variant(tmp_path, num_clases=47)

    with pytest.raises(ValueError, match="num_clases"):
        load_manifest("dtd", manifest_dir=tmp_path)


def test_invalid_loader_lists_valid_values(tmp_path):
    write_variant(tmp_path, loader="folders")

    with pytest.raises(ValueError) as info:
        load_manifest("dtd", manifest_dir=tmp_path)

    assert "'loader'" in str(info.value)
    assert "split_json" in str(info.value)


def test_template_needs_exactly_one_slot(tmp_path):
    write_variant(tmp_path, template="{} and {} texture.")

    with pytest.raises(ValueError, match="template"):
        load_manifest("dtd", manifest_dir=tmp_path)


def test_num_base_must_be_half_rounded_up(tmp_path):
    write_variant(tmp_path, base_novel={"num_base": 23, "last_base": "marbled", "first_novel": "matted"})

    with pytest.raises(ValueError) as info:
        load_manifest("dtd", manifest_dir=tmp_path)

    assert "base_novel.num_base" in str(info.value)
    assert "24" in str(info.value)


def test_counts_must_cover_every_split(tmp_path):
    write_variant(tmp_path, counts={"train": 2820, "test": 1692})

    with pytest.raises(ValueError, match="counts"):
        load_manifest("dtd", manifest_dir=tmp_path)


def test_every_fact_needs_a_source(tmp_path):
    raw = yaml.safe_load((MANIFEST_DIR / "dtd.yaml").read_text(encoding="utf-8"))
    del raw["sources"]["counts"]
    write_variant(tmp_path, sources=raw["sources"])

    with pytest.raises(ValueError) as info:
        load_manifest("dtd", manifest_dir=tmp_path)

    assert "sources" in str(info.value)
    assert "counts" in str(info.value)


def test_unconfirmed_must_name_a_field(tmp_path):
    write_variant(tmp_path, unconfirmed={"cuonts.test": "typo"})

    with pytest.raises(ValueError, match="cuonts.test"):
        load_manifest("dtd", manifest_dir=tmp_path)


def test_name_must_match_file_name(tmp_path):
    write_variant(tmp_path, name="textures")

    with pytest.raises(ValueError, match="dtd.yaml"):
        load_manifest("dtd", manifest_dir=tmp_path)


def test_split_file_required_for_split_json(tmp_path):
    write_variant(tmp_path, split_file=None)

    with pytest.raises(ValueError, match="split_file"):
        load_manifest("dtd", manifest_dir=tmp_path)


def test_known_label_outside_range_is_rejected(tmp_path):
    raw = yaml.safe_load((MANIFEST_DIR / "dtd.yaml").read_text(encoding="utf-8"))
    raw["class_names"]["known"] = {47: "zigzagged"}
    write_variant(tmp_path, class_names=raw["class_names"])

    with pytest.raises(ValueError, match="class_names.known"):
        load_manifest("dtd", manifest_dir=tmp_path)


def test_missing_manifest_folder_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_datasets(tmp_path / "nowhere")
