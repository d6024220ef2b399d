"""Readers for the texts the evaluation set is built from, each with its provenance.

- botocore's API models (``botocore/data/<service>/<version>/service-2.json.gz``, Apache-2.0): the
  overview of each AWS service and the description of each of its operations, HTML turned into text;
- the Python reference manual's sections as ``pydoc`` shows them (``pydoc_data/topics.py``, PSF-2.0);
- paragraphs of installed packages' READMEs (the long description in ``*.dist-info/METADATA``).
"""

from __future__ import annotations

import gzip
import importlib.metadata
import json
import platform
import re
import sysconfig
from dataclasses import dataclass
from functools import cache
from html.parser import HTMLParser
from pathlib import Path

from restspec.datastore.default import stdlib_files


@dataclass(frozen=True)
class Provenance:
    """Where one prompt's text comes from."""

    package: str
    """Distribution the text ships in (``python``: the standard library; ``restspec``: written here)."""
    version: str
    """Its installed version (empty for text this repository writes)."""
    license: str
    """The license of that text, as its distribution declares it."""
    path: str
    """File that holds the text, inside site-packages, the standard library or this repository."""
    parts: tuple[str, ...]
    """Which pieces of that file: topic names, operation names, paragraph numbers."""
    in_default_datastore: bool
    """True when the file is one restspec's default datastore is built from (retrieval has seen it)."""


def _in_default_datastore(path: Path) -> bool:
    return path.resolve() in _default_datastore_files()


@cache
def _default_datastore_files() -> frozenset[Path]:
    return frozenset(p.resolve() for p in stdlib_files())


class _HTMLText(HTMLParser):
    """Text of an HTML fragment: one line per block element, list items as ``- item``."""

    BLOCKS = frozenset({"p", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "br", "div"})

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag == "li":
            self.parts.append("\0")  # marks a list item; its text may start inside a nested <p>

    def handle_endtag(self, tag: str) -> None:
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data: str) -> None:
        self.parts.append(data)


def html_to_text(html: str) -> str:
    """Plain text of botocore's HTML documentation strings."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    text = re.sub(r"\0\s*", "\n- ", "".join(parser.parts))
    lines = (re.sub(r"\s+", " ", line).strip() for line in text.split("\n"))
    return "\n".join(line for line in lines if line and line != "-")


@dataclass(frozen=True)
class Service:
    """One AWS service's API model from botocore."""

    name: str
    full_name: str
    overview: str
    operations: dict[str, str]
    """Operation name -> its description as text, in name order."""
    provenance: Provenance


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


@cache
def botocore_services() -> tuple[Service, ...]:
    """Every service in the installed botocore (newest API version of each), in name order."""
    import botocore

    root = Path(botocore.__file__).parent / "data"
    version = importlib.metadata.version("botocore")
    license_ = dist_license("botocore")
    services = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        models = sorted(folder.glob("*/service-2.json.gz"))
        if not models:
            continue
        model = json.loads(gzip.decompress(models[-1].read_bytes()))
        path = models[-1].relative_to(root.parent.parent).as_posix()
        described = sorted(model["operations"].items())
        operations = {name: html_to_text(op.get("documentation", "")) for name, op in described}
        services.append(
            Service(
                name=folder.name,
                full_name=model["metadata"].get("serviceFullName", folder.name),
                overview=html_to_text(model.get("documentation", "")),
                operations=operations,
                provenance=Provenance("botocore", version, license_, path, (), False),
            )
        )
    return tuple(services)


def pydoc_topic(name: str) -> tuple[str, Provenance]:
    """One section of the Python reference manual as ``help('<topic>')`` shows it."""
    import pydoc_data.topics

    path = Path(pydoc_data.topics.__file__)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    provenance = Provenance(
        "python",
        platform.python_version(),
        "PSF-2.0",
        path.relative_to(stdlib).as_posix(),
        (name,),
        _in_default_datastore(path),
    )
    return pydoc_data.topics.topics[name].strip(), provenance


def dist_license(name: str) -> str:
    """A distribution's license as its metadata declares it (SPDX expression, short field or classifiers)."""
    meta = importlib.metadata.metadata(name)
    if meta.get("License-Expression"):
        return meta["License-Expression"]
    declared = (meta.get("License") or "").strip()
    if declared and "\n" not in declared and len(declared) <= 60:
        return declared
    classifiers = meta.get_all("Classifier") or []
    licenses = [c.rsplit(" :: ", 1)[-1] for c in classifiers if c.startswith("License ::")]
    if not licenses:
        raise ValueError(f"{name}: no license in its metadata; choose another source")
    return " / ".join(licenses)


def plain_markup(text: str) -> str:
    """Markdown and reStructuredText inline markup as plain text: links keep their words."""
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # [words](url)
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`__?", r"\1", text)  # `words <url>`_
    text = re.sub(r"`([^`]+)`_\b", r"\1", text)  # `Name`_
    text = re.sub(r"\b([A-Za-z][A-Za-z0-9]*)_(?=[\s.,;:)])", r"\1", text)  # Name_
    text = re.sub(r"(?<![\[`])\[([A-Za-z][\w ]*)\](?![\]`(])", r"\1", text)  # [Name] (reference link)
    text = text.replace("``", "`").replace("**", "")
    return re.sub(r"(?<![\w*])\*(\w[^*]*?)\*(?![\w*])", r"\1", text)  # *emphasis*


def readme_paragraph(name: str, index: int, starts: str) -> tuple[str, Provenance]:
    """Paragraph ``index`` (paragraphs split at blank lines) of a distribution's README as plain text.

    ``starts`` is how the paragraph begins; another version of the package fails here, by name, instead
    of quietly giving another paragraph.
    """
    dist = importlib.metadata.distribution(name)
    body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
    paragraphs = [re.sub(r"\s+", " ", p).strip() for p in re.split(r"\n\s*\n", body)]
    text = plain_markup(paragraphs[index]) if index < len(paragraphs) else ""
    if not text.startswith(starts):
        raise ValueError(
            f"{name} {dist.version}: README paragraph {index} does not start with {starts!r} "
            f"(got {text[:60]!r}); the evaluation set was built from another version"
        )
    metadata = next(f for f in dist.files or () if f.name == "METADATA")
    provenance = Provenance(
        dist.metadata["Name"],
        dist.version,
        dist_license(name),
        metadata.as_posix(),
        (f"README paragraph {index}",),
        False,
    )
    return text, provenance
