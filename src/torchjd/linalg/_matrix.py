from torch import Tensor


class Matrix(Tensor):
    """Static type marker for a tensor with exactly two dimensions (a Jacobian ``[m, n]``).

    Never instantiated and never checked at run time: plain tensors are always passed.
    """


class PSDTensor(Tensor):
    """Static type marker for a generalised Gramian: a tensor of shape ``S + reversed(S)`` whose
    flattening into a square matrix is positive semi-definite."""


class PSDMatrix(PSDTensor, Matrix):
    """Static type marker for a square, symmetric, positive semi-definite matrix, typically the
    Gramian ``G = J J^T`` of a Jacobian."""
