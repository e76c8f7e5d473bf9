"""Hand-crafted prompt templates: class name in, sentence out.

A template is a ``str.format`` pattern with one ``{}`` slot for the class name. The
zero-shot classifier averages the text features of several templates per class; CoOp
replaces the words around the slot with learned context vectors.
"""

from __future__ import annotations

# Single template for Fashion-MNIST. The downstream images are rendered in the style
# capt_lib.data.styles.DOWNSTREAM_STYLE, and a caller that wants to name that style in
# the prompt passes its own templates.
FASHION_MNIST_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)

# One template per dataset, as the CoOp code base (KaiyangZhou/CoOp, trainers/zsclip.py,
# CUSTOM_TEMPLATES) uses for zero-shot CLIP. Keys are CoOp's dataset class names.
CUSTOM_TEMPLATES: dict[str, str] = {
    "OxfordPets": "a photo of a {}, a type of pet.",
    "OxfordFlowers": "a photo of a {}, a type of flower.",
    "FGVCAircraft": "a photo of a {}, a type of aircraft.",
    "DescribableTextures": "{} texture.",
    "EuroSAT": "a centered satellite photo of {}.",
    "StanfordCars": "a photo of a {}.",
    "Food101": "a photo of {}, a type of food.",
    "SUN397": "a photo of a {}.",
    "Caltech101": "a photo of a {}.",
    "UCF101": "a photo of a person doing {}.",
    "ImageNet": "a photo of a {}.",
    "ImageNetSketch": "a photo of a {}.",
    "ImageNetV2": "a photo of a {}.",
    "ImageNetA": "a photo of a {}.",
    "ImageNetR": "a photo of a {}.",
}

# A small, generic ensemble for zero-shot classification. Every word is common English,
# but a compact-vocabulary tokenizer (MiniCLIP's) may still map some of them to its
# unknown token, so check a template against the tokenizer before relying on it.
ENSEMBLE_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a good photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a drawing of a {}.",
)


def format_classname(name: str) -> str:
    """Turn a folder-style class name into prompt text: underscores become spaces."""
    return name.replace("_", " ")


def validate_templates(templates: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Check that ``templates`` is a non-empty sequence of patterns with exactly one ``{}`` each.

    Returns the templates as a tuple. A bare string is rejected because iterating it
    would silently treat every character as a template.
    """
    if isinstance(templates, str):
        raise ValueError(f"templates must be a list of strings, not the single string {templates!r}; wrap it in a list")
    templates = tuple(templates)
    if not templates:
        raise ValueError("templates is empty; pass at least one pattern such as 'a photo of a {}.'")

    for template in templates:
        if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
            raise ValueError(
                f"template {template!r} is invalid: it must contain exactly one '{{}}' slot for the class name "
                "and no other braces"
            )
    return templates


def fill_templates(templates: list[str] | tuple[str, ...], classname: str) -> list[str]:
    """Return one sentence per template for ``classname`` (formatted with ``format_classname``)."""
    name = format_classname(classname)
    return [template.format(name) for template in validate_templates(templates)]
