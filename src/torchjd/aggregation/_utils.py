"""Small helpers shared by several aggregators."""

from torch import Tensor

from torchjd.aggregation._bases import Weighting


def format_vector(vector: Tensor) -> str:
    """Format a vector for ``str``: two decimals per entry, trailing zeros removed.

    ``tensor([0.1234, 1.005, 10., -0.5])`` gives ``"[0.12, 1., 10., -0.5]"``.
    """
    entries = [f"{float(x):.2f}".rstrip("0") for x in vector]
    return "[" + ", ".join(entries) + "]"


def check_pref_vector(pref_vector: Tensor | None) -> None:
    if pref_vector is not None and pref_vector.ndim != 1:
        raise ValueError(
            "`pref_vector` must be a vector (a tensor of dimension 1) or None, got a tensor of "
            f"dimension {pref_vector.ndim}."
        )


def pref_vector_to_weighting(pref_vector: Tensor | None, default: Weighting) -> Weighting:
    """The weighting that produces the preference weights: ``default`` or the constant vector."""
    from torchjd.aggregation._constant import ConstantWeighting

    check_pref_vector(pref_vector)
    if pref_vector is None:
        return default
    return ConstantWeighting(pref_vector)


def pref_vector_str(name: str, pref_vector: Tensor | None) -> str:
    return name if pref_vector is None else f"{name}({format_vector(pref_vector)})"
