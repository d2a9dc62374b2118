"""kernels/alloc.py: the shared zero fill the Triton strategies accumulate their parameter gradients into."""

import pytest
import torch

pytest.importorskip("triton")
from lorafast.kernels import alloc  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_zeros_views_are_zero_disjoint_aligned(dtype):
    shapes = [(3, 5), None, (7,), (1, 1), (2, 3, 4)]
    views = alloc.zeros_views(shapes, dtype, torch.device("cpu"))
    assert views[1] is None
    real = [v for v in views if v is not None]
    base = real[0].untyped_storage().data_ptr()
    for view, shape in zip(real, [s for s in shapes if s is not None]):
        assert view.shape == shape and view.dtype == dtype and view.is_contiguous()
        assert torch.count_nonzero(view) == 0
        assert view.untyped_storage().data_ptr() == base  # one storage: one fill
        assert (view.data_ptr() - real[0].data_ptr()) % 64 == 0
    for i, view in enumerate(real):  # writing one view leaves the others untouched: no overlap
        view.fill_(i + 1)
    for i, view in enumerate(real):
        assert torch.all(view == i + 1)


def test_zeros_views_all_none():
    assert alloc.zeros_views([None, None], torch.float32, torch.device("cpu")) == [None, None]
