"""Check for optional dependencies when an object that needs them is constructed."""

from importlib.util import find_spec


def require(owner: str, modules: tuple[str, ...], extra: str) -> None:
    """Raise an ``ImportError`` naming ``owner``, the missing modules and the extra to install.

    Modules are looked up with :func:`importlib.util.find_spec`, never imported, so the check is
    cheap and importing :mod:`torchjd` never needs an optional package.
    """
    missing = [name for name in modules if find_spec(name) is None]
    if missing:
        raise ImportError(
            f"{owner} needs the optional packages {missing}, which are not installed. "
            f'Install them with `pip install "torchjd[{extra}]"`.'
        )
