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


def test_zeros_views_memoised_layout_gives_fresh_zeros_each_call():
    shapes = ((3, 5), (7,), None)
    first = alloc.zeros_views(shapes, torch.float32, torch.device("cpu"))
    first[0].fill_(1.0)
    second = alloc.zeros_views(list(shapes), torch.float32, torch.device("cpu"))  # a list hits the same layout
    assert second[0].untyped_storage().data_ptr() != first[0].untyped_storage().data_ptr()
    assert torch.count_nonzero(second[0]) == 0 and second[2] is None
    assert [v.shape for v in second[:2]] == [(3, 5), (7,)]
