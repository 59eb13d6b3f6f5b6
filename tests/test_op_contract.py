"""The public op API is a contract (fastad/ops/contract.py): every op and torch.ops.fastad schema is
listed with its exact signature, tied to fastad.__version__, and runs under torch.compile."""
from __future__ import annotations

import inspect

import pytest
import torch

import fastad
import fastad.ops as ops
from fastad.ops import contract, dispatch

BUMP = ("a changed op signature needs a new fastad.__version__, the row in fastad/ops/contract.py updated and "
        "a new RELEASED entry")


def _python_signatures() -> dict[str, str]:
    out = {}
    for name in ops.__all__:
        obj = getattr(ops, name)
        if inspect.ismodule(obj):
            continue
        out[name] = str(inspect.signature(obj))
        if inspect.isclass(obj):
            for meth, fn in inspect.getmembers(obj, inspect.isfunction):
                if not meth.startswith("_"):
                    out[f"{name}.{meth}"] = str(inspect.signature(fn))
    return out


def _schemas() -> dict[str, str]:
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("fastad::"))
    return {n.split("::")[1]: str(getattr(torch.ops.fastad, n.split("::")[1]).default._schema) for n in names}


def test_version_and_fingerprint():
    assert contract.VERSION == fastad.__version__, BUMP
    assert contract.RELEASED.get(fastad.__version__) == contract.fingerprint(), BUMP


def test_every_public_op_is_listed_with_its_signature():
    code = _python_signatures()
    listed = {n: sig for n, (sig, _) in contract.OPS.items()}
    assert set(code) == set(listed), f"ops not in the contract: {sorted(set(code) - set(listed))}; " \
                                     f"listed but gone: {sorted(set(listed) - set(code))}. {BUMP}"
    for name, sig in code.items():
        assert sig == listed[name], f"{name}: code {sig} != contract {listed[name]}. {BUMP}"
        assert contract.OPS[name][1].strip(), f"{name} has no contract text"
        assert inspect.getdoc(getattr(ops, name.split(".")[0])), f"{name} has no docstring"


def test_every_registered_schema_is_listed():
    code = _schemas()
    extension = {"kcenter_greedy", "kcenter_greedy_stats", "kcenter_init", "kcenter_step", "knn_rescore", "nearest_reference"}
    listed = {n: sig for n, (sig, _) in contract.SCHEMAS.items()}
    if not dispatch.HAS_EXTENSION:  # a build without fastad._C registers only the Python-defined ops
        listed = {n: s for n, s in listed.items() if n not in extension}
    assert set(code) == set(listed), f"{sorted(set(code) ^ set(listed))}. {BUMP}"
    for name, sig in code.items():
        assert sig == listed[name], f"torch.ops.fastad.{name}: {sig} != contract {listed[name]}. {BUMP}"


def _cases():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    qkv = (r(1, 2, 12, 8), r(1, 2, 12, 8), r(1, 2, 12, 8))
    feats, bank = r(30, 16), r(9, 16)
    enc, dec = r(2, 4, 5, 5), r(2, 4, 5, 5)
    return {
        "greedy_coreset": (lambda f: ops.greedy_coreset(f * 1.0, 5), (feats,)),
        "nearest_reference": (lambda x, b: ops.nearest_reference(x * 1.0, b)[0], (feats, bank)),
        "quantile": (lambda x: ops.quantile(x * 1.0, 0.7), (feats,)),
        "select_rank": (lambda x: ops.select_rank(x * 1.0, 17), (feats,)),
        "neighbour_masked_attention": (lambda q, k, v: ops.neighbour_masked_attention(q, k, v, (3, 4), 3), qkv),
        "local_window_attention": (lambda q, k, v: ops.local_window_attention(q, k, v, (3, 4), 3), qkv),
        "linear_attention": (lambda q, k, v: ops.linear_attention(q, k, v), qkv),
        "window_mask": (lambda x: ops.window_mask((3, 4), 3) & (x > -10).all(), (feats,)),
        "hard_mining_cosine_loss": (lambda a, b: ops.hard_mining_cosine_loss(a, b * 1.0, 0.5), (enc, dec)),
        "adc_loss": (lambda m: ops.adc_loss(m.square()), (r(2, 9, 9),)),
        "gaussian_blur": (lambda m: ops.gaussian_blur(m * 1.0, 1.5), (r(2, 9, 9),)),
        "gaussian_blur_small": (lambda m: ops.gaussian_blur_small(m * 1.0), (r(2, 9, 9),)),
        "FeatureBank.search": (lambda x, b: _bank_search(x, b), (feats, bank)),
        "knn_rescore": (lambda s, x, b: ops.knn_rescore(s * 1.0, torch.full((30,), 0.5, dtype=torch.float64), x, b, 2)[0],
                        (r(30, 9), feats, bank)),
    }


def _bank_search(x, b):
    fb = ops.FeatureBank(b.shape[1])
    fb.add(b)
    return fb.search(x * 1.0, 3)[0]


def test_compile_cases_cover_every_op():
    covered = set(_cases()) | {n for n in contract.OPS if n.endswith("_reference") or n in ("FeatureBank", "FeatureBank.add")}
    assert covered == set(contract.OPS)


@pytest.mark.parametrize("name", sorted(_cases()))
def test_every_op_runs_under_torch_compile(name):
    fn, args = _cases()[name]
    torch._dynamo.reset()
    want = fn(*args)
    got = torch.compile(fn, backend="aot_eager")(*args)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got, want), name  # the same kernels run: bit-identical
