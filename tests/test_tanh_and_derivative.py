"""tanh_and_derivative: (tanh(x), 1 − tanh(x)²) against float64 torch.tanh, special values,
layouts, opcheck and bad input."""
import pytest
import torch

from trpo_ext._tanh_and_derivative import tanh_and_derivative


def _grid(dtype, device):
    x = torch.cat([torch.linspace(-12.0, 12.0, 40001, dtype=torch.float64),
                   torch.tensor([1e-30, -1e-30, 1e-8, 0.3999999, 0.4, 0.4000001, -0.4, 9.0, 9.5,
                                 10.0, 10.5, 30.0, -30.0], dtype=torch.float64)])
    return x.to(dtype=dtype, device=device)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_values_against_float64_tanh(dtype, device):
    x = _grid(dtype, device).reshape(-1, 1)  # any shape: [N, 1]
    y, d = tanh_and_derivative(x)
    assert y.shape == x.shape and d.shape == x.shape and y.dtype == dtype and d.dtype == dtype
    ref = torch.tanh(x.cpu().double())
    # float32: ATen's vectorised tanh on the CPU, tanhf on CUDA, within a few ulp; float64: libm /
    # libdevice tanh
    rtol, atol = (4e-7, 0.0) if dtype == torch.float32 else (1e-15, 0.0)
    torch.testing.assert_close(y.cpu().double(), ref, rtol=rtol, atol=atol)
    # the derivative, in [0, 1]: 1 − y² carries y's error doubled (and is formed with an FMA on
    # AVX2 machines, so it need not equal torch's separate multiply and subtract bit for bit)
    torch.testing.assert_close(d.cpu().double(), 1 - ref * ref, rtol=0, atol=2 * rtol + 1e-15)
    # odd, and monotone
    torch.testing.assert_close(tanh_and_derivative(-x)[0], -y, rtol=0, atol=0)
    around = torch.tensor([0.39999, 0.3999999, 0.4, 0.4000001, 0.40001], dtype=dtype, device=device)
    assert bool((tanh_and_derivative(around)[0].diff() >= 0).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_special_values(dtype, device):
    x = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 50.0], dtype=dtype,
                     device=device)
    y, d = tanh_and_derivative(x)
    y, d = y.cpu(), d.cpu()
    assert y[0] == 0 and not torch.signbit(y[0]) and y[1] == 0 and torch.signbit(y[1])
    assert y[2] == 1 and y[3] == -1 and y[5] == 1 and d[2] == 0 and d[3] == 0 and d[5] == 0
    assert torch.isnan(y[4]) and torch.isnan(d[4])
    assert d[0] == 1


def test_layouts_and_empty(device):
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(300, 70, generator=g)).to(device)
    y, d = tanh_and_derivative(x)
    yt, dt = tanh_and_derivative(x.t())  # non-contiguous: the same values, contiguous outputs
    assert torch.equal(yt, y.t()) and torch.equal(dt, d.t()) and yt.is_contiguous()
    e = torch.empty(0, 5, device=device)
    ye, de = tanh_and_derivative(e)
    assert ye.shape == (0, 5) and de.shape == (0, 5)


def test_opcheck(device):
    for x in (torch.randn(17, 9, device=device), torch.randn(5, dtype=torch.float64, device=device)):
        torch.library.opcheck(torch.ops.trpo_ext.tanh_and_derivative.default, (x,))


def test_bad_input():
    with pytest.raises(TypeError, match="x must be float32 or float64, got"):
        tanh_and_derivative(torch.zeros(3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be float32 or float64, got"):
        tanh_and_derivative(torch.zeros(3, dtype=torch.float16))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        tanh_and_derivative([0.0, 1.0])
