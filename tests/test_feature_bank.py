import pytest
import torch

from fastad.ops import FeatureBank


def _brute(q, b, k):
    d = torch.cdist(q.double(), b.double()).pow(2)
    return d.topk(k, largest=False)


@pytest.mark.parametrize("n,q,k", [(1, 1, 1), (100, 7, 3), (3000, 513, 9)])
def test_torch_backend_exact(n, q, k):
    bank = FeatureBank(32)
    data = torch.randn(n, 32)
    bank.add(data[: n // 2 + 1])
    bank.add(data[n // 2 + 1 :]) if n > 1 else None
    queries = torch.randn(q, 32)
    d, i = bank.search(queries, k)
    wd, wi = _brute(queries, data, k)
    assert torch.equal(i, wi) and d.dtype == torch.float32
    torch.testing.assert_close(d.double(), wd, rtol=1e-4, atol=1e-4)


def test_faiss_flat_equals_torch():
    pytest.importorskip("faiss")
    data, queries = torch.randn(2000, 48), torch.randn(300, 48)
    t, f = FeatureBank(48), FeatureBank(48, backend="faiss")
    t.add(data)
    f.add(data)
    (td, ti), (fd, fi) = t.search(queries, 5), f.search(queries, 5)
    assert torch.equal(ti, fi)
    torch.testing.assert_close(td, fd, rtol=1e-4, atol=1e-4)


def test_faiss_ivf_finds_exact_nearest_when_probing_all_lists():
    pytest.importorskip("faiss")
    data = torch.randn(4000, 16)
    f = FeatureBank(16, backend="faiss", ivf_nlist=16, nprobe=16)
    f.add(data)
    queries = data[:50] + 0.01 * torch.randn(50, 16)
    _, i = f.search(queries, 1)
    assert torch.equal(i[:, 0], torch.arange(50))


def test_errors():
    bank = FeatureBank(4)
    with pytest.raises(ValueError, match="empty"):
        bank.search(torch.randn(2, 4))
    bank.add(torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 3\]"):
        bank.search(torch.randn(2, 4), 4)
    with pytest.raises(ValueError, match=r"\(Q, 4\)"):
        bank.search(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        bank.add(torch.randn(2, 3))
    with pytest.raises(ValueError, match="NaN"):
        bank.add(torch.tensor([[float("nan")] * 4]))
    with pytest.raises(ValueError, match="backend"):
        FeatureBank(4, backend="annoy")
