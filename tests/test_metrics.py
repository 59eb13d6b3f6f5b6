import pytest
import torch
from sklearn.metrics import roc_auc_score

from fastad.metrics import auroc


@pytest.mark.parametrize("n,levels", [(2, None), (100, None), (1000, 5), (50000, 50)])
def test_auroc_equals_sklearn(n, levels):
    y = torch.randint(0, 2, (n,))
    y[0], y[1] = 0, 1
    s = torch.randn(n) + y if levels is None else torch.randint(0, levels, (n,)).float() + y  # ties
    assert auroc(s, y) == pytest.approx(roc_auc_score(y.numpy(), s.numpy()), abs=1e-12)


def test_auroc_errors():
    with pytest.raises(ValueError, match="both classes"):
        auroc(torch.rand(5), torch.zeros(5))
    with pytest.raises(ValueError, match="NaN"):
        auroc(torch.tensor([0.1, float("nan")]), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="differ in size"):
        auroc(torch.rand(3), torch.tensor([0, 1]))
