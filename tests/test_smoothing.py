import numpy as np
import pytest
import torch
from scipy.ndimage import gaussian_filter

from fastad.ops import gaussian_blur


@pytest.mark.parametrize("shape,sigma", [((1, 1), 4.0), ((5, 7), 4.0), ((2, 224, 224), 4.0), ((3, 31, 17), 1.5)])
def test_equals_scipy(shape, sigma):
    x = torch.rand(*shape, dtype=torch.float64)
    got = gaussian_blur(x, sigma)
    flat = x.reshape(-1, *shape[-2:]).numpy()
    want = np.stack([gaussian_filter(m, sigma) for m in flat]).reshape(shape)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_half_precision_and_errors():
    x = torch.rand(2, 20, 20)
    torch.testing.assert_close(gaussian_blur(x.half()).float(), gaussian_blur(x), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(x, 0)
    with pytest.raises(ValueError, match=r"\(\.\.\., H, W\)"):
        gaussian_blur(torch.rand(5))
