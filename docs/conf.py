"""Sphinx configuration of the torchjd documentation.

Build it with ``bash scripts/docs.sh``: warnings are errors, cross-references (including links
between pages and to headings) are checked, and the API reference is checked to cover every
public name of every public package of :mod:`torchjd`.
"""

import importlib
import importlib.util
import pkgutil
import posixpath
import re
import typing
from pathlib import Path

from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment
from sphinx.util import logging

import torchjd

_HERE = Path(__file__).resolve().parent
_LOGGER = logging.getLogger(__name__)

project = "torchjd"
author = "torchjd maintainers"
copyright = "torchjd maintainers"
release = torchjd.__version__

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    # MathJax bundled with the site (copied into _static/mathjax), so that the formulas render
    # offline: no CDN.
    "sphinx-mathjax-offline",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build", "_static"]
root_doc = "index"

# Markdown pages: $...$ and $$...$$ maths, and an anchor for every heading down to level 3 so
# that links such as ``concepts.md#the-gramian`` are checked.
myst_enable_extensions = ["dollarmath", "amsmath", "colon_fence"]
myst_heading_anchors = 3

# API reference: the docstrings are reST with Sphinx field lists (``:param x:``) and
# ``:math:`` roles, which autodoc reads natively.
autodoc_default_options = {"members": True, "undoc-members": True, "show-inheritance": True}
autodoc_member_order = "alphabetical"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
add_module_names = False

# Every cross-reference must resolve, except those to other projects (no intersphinx: the build
# runs offline) and to private names mentioned in docstrings.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:.*", r"(torch|typing|collections|abc|enum|numpy)(\..*)?"),
    (r"py:.*", r"(Tensor|Module|Generic|ABC|Callable|Iterable|Sequence|Literal|T|Any)"),
    (r"py:.*", r"(int|float|bool|str|None|tuple|list|dict|object)"),
    (r"py:.*", r"(.*\.)?_[A-Za-z0-9_.]*"),  # private modules, functions and attributes
    (r"py:.*", r"(state_dict|load_state_dict)"),  # methods of torch.nn.Module
]

html_theme = "furo"
html_title = f"torchjd {release}"
html_static_path = ["_static"]
html_css_files = ["tables.css"]
html_show_sourcelink = False

# Pages and API modules that are being written: listed in the navigation, left out of the build
# (with a note, not a warning) while they are missing, so that the build stays green.
# e.g. _OPTIONAL_PAGES = {"multi_gpu": _HERE / "multi_gpu.md"}
# and _OPTIONAL_MODULES = {"api/newpackage": "torchjd.newpackage"}. Empty: everything is written.
_OPTIONAL_PAGES: dict[str, Path] = {}
_OPTIONAL_MODULES: dict[str, str] = {}


def _module_exists(name: str) -> bool:
    """Whether ``name`` is a regular module or package (a folder without ``__init__`` is not)."""
    try:
        spec = importlib.util.find_spec(name)
    except ImportError:
        return False
    return spec is not None and spec.origin is not None


_MISSING = {doc for doc, path in _OPTIONAL_PAGES.items() if not path.exists()} | {
    doc for doc, module in _OPTIONAL_MODULES.items() if not _module_exists(module)
}
for _doc in sorted(_MISSING):
    print(f"torchjd docs: {_doc} is not written yet; it is left out of this build.")
exclude_patterns += [f"{doc}.rst" for doc in _MISSING] + [f"{doc}.md" for doc in _MISSING]


def _drop_missing_from_toctrees(app: Sphinx, docname: str, source: list[str]) -> None:
    """Drop the toctree entries and table rows of optional pages not written yet; unlink links."""
    if not _MISSING:
        return
    folder = docname.rpartition("/")[0]
    relative = {posixpath.relpath(doc, folder or ".") for doc in _MISSING}
    links = re.compile(
        "|".join(rf"\]\({re.escape(rel)}\.(?:md|rst)(?:#[^)]*)?\)" for rel in sorted(relative))
    )
    kept = [
        line
        for line in source[0].splitlines(keepends=True)
        if line.strip() not in relative  # a toctree entry
        and not (line.startswith("|") and links.search(line))  # a table row about the page
    ]
    text = "".join(kept)
    for rel in relative:
        text = re.sub(rf"\[([^\]]*)\]\({re.escape(rel)}\.(?:md|rst)(?:#[^)]*)?\)", r"\1", text)
    source[0] = text


_BASE_CLASSES = {"Aggregator", "Weighting", "WeightedAggregator", "Scalarizer"}


def _skip_torch_plumbing(
    app: Sphinx, what: str, name: str, obj: object, skip: bool, options: object
) -> bool | None:
    """Leave out the ``nn.Module`` plumbing: state hooks, and ``forward`` of concrete classes.

    Users call the object, not its ``forward``; only the base classes, whose ``forward`` is what a
    subclass implements, show it.
    """
    if name in {"get_extra_state", "set_extra_state", "extra_repr"}:
        return True
    if name == "forward":
        owner = getattr(obj, "__qualname__", "").partition(".")[0]
        return owner not in _BASE_CLASSES
    return None


def _public_objects() -> set[int]:
    """The ids of every object that a public package of :mod:`torchjd` exports."""
    objects = set()
    for package in _public_packages():
        module = importlib.import_module(package)
        objects.update(id(getattr(module, name)) for name in getattr(module, "__all__", []))
    return objects


def _hide_private_bases(
    app: Sphinx, name: str, obj: object, options: object, bases: list[type]
) -> None:
    """Leave out of "Bases:" the torchjd classes that no public package exports (such as the
    mixin that runs non-differentiable aggregators under ``no_grad``): the reader could not
    follow the link."""
    public = _public_objects()
    bases[:] = [
        base
        for base in bases
        if not getattr(base, "__module__", "").startswith("torchjd")
        or id(typing.get_origin(base) or base) in public
    ]


def _public_packages() -> list[str]:
    names = ["torchjd"]
    for info in pkgutil.iter_modules(torchjd.__path__):
        if not info.name.startswith("_"):
            names.append(f"torchjd.{info.name}")
    return names


def _check_api_coverage(app: Sphinx, env: BuildEnvironment) -> None:
    """Warn (an error under ``-W``) for any public package or public name not documented."""
    domain = env.get_domain("py")
    objects = set(domain.objects)
    modules = set(domain.modules)
    for package in _public_packages():
        if package not in modules:
            _LOGGER.warning("API reference: no page documents the package %s.", package)
            continue
        module = importlib.import_module(package)
        for name in getattr(module, "__all__", []):
            if f"{package}.{name}" not in objects:
                _LOGGER.warning("API reference: %s.%s is not documented.", package, name)


def setup(app: Sphinx) -> dict[str, bool]:
    app.connect("source-read", _drop_missing_from_toctrees)
    app.connect("env-check-consistency", _check_api_coverage)
    app.connect("autodoc-skip-member", _skip_torch_plumbing)
    app.connect("autodoc-process-bases", _hide_private_bases)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


# The training-framework integrations subclass their framework's classes: the API pages are built
# without installing the frameworks.
autodoc_mock_imports = ["lightning", "transformers"]
nitpick_ignore = [
    ("py:class", "lightning.pytorch.LightningModule"),
    ("py:class", "transformers.trainer.Trainer"),
]
