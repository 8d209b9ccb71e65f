"""The restricted unpickler: reads plain data pickles, refuses (without running) anything else."""

from __future__ import annotations

import collections
import io
import os
import pickle
import subprocess

import numpy as np
import pytest
import torch

from distreward.utils.safe_pickle import EasyDict, PersistentObject, UnsafePickleError, module_state_dict, safe_load


def reference_stats_like() -> dict:
    """The shape of a reference-statistics pickle: nested dicts of float64 numpy arrays (EDM2's dataset-refs)."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((6, 6))
    return {"fid": {"mu": rng.standard_normal(6), "sigma": a @ a.T},
            "fd_dinov2": {"mu": rng.standard_normal(4).astype(np.float32), "sigma": np.eye(4)},
            "n": np.int64(50000), "note": "ref", "shape": (3, 64, 64)}


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_numpy_dicts_round_trip_every_protocol(protocol, tmp_path):
    data = reference_stats_like()
    blob = pickle.dumps(data, protocol=protocol)
    (tmp_path / "refs.pkl").write_bytes(blob)
    for source in (blob, tmp_path / "refs.pkl", str(tmp_path / "refs.pkl"), io.BytesIO(blob)):
        out = safe_load(source)
        assert out.keys() == data.keys() and out["note"] == "ref" and out["shape"] == (3, 64, 64)
        for k in ("fid", "fd_dinov2"):
            for s in ("mu", "sigma"):
                assert out[k][s].dtype == data[k][s].dtype
                np.testing.assert_array_equal(out[k][s], data[k][s])
        assert out["n"] == 50000 and isinstance(out["n"], np.integer)


def test_tensors_parameters_views_and_containers():
    base = torch.arange(12, dtype=torch.float32)
    data = collections.OrderedDict(
        half=torch.randn(3, 4).half(), bf16=torch.randn(5).bfloat16(), view=base[3:9].view(2, 3),
        param=torch.nn.Parameter(torch.randn(2, 2)), frozen=torch.nn.Parameter(torch.ones(3), requires_grad=False),
        ints=torch.arange(4), dtype=torch.float16, size=torch.Size([2, 3]), s={1, 2}, fs=frozenset({3}),
        obj=np.array([1, "a", None], dtype=object))
    out = safe_load(pickle.dumps(data))
    assert isinstance(out, collections.OrderedDict) and list(out) == list(data)
    for k in ("half", "bf16", "view", "ints"):
        assert out[k].dtype == data[k].dtype and torch.equal(out[k], data[k])
    assert isinstance(out["param"], torch.nn.Parameter) and out["param"].requires_grad
    assert not out["frozen"].requires_grad and torch.equal(out["frozen"], data["frozen"])
    assert out["dtype"] is torch.float16 and out["size"] == torch.Size([2, 3])
    assert out["s"] == {1, 2} and out["fs"] == frozenset({3}) and list(out["obj"]) == [1, "a", None]


class _RunsCommand:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func,blocked", [(os.system, "system"), (eval, "builtins.eval"),
                                          (subprocess.call, "subprocess.call"), (torch.load, "torch.serialization.load")])
def test_code_is_refused_and_never_runs(func, blocked, tmp_path):
    marker = tmp_path / "pwned"
    args = {os.system: (f"touch {marker}",), eval: (f"open({str(marker)!r}, 'w')",),
            subprocess.call: (["touch", str(marker)],), torch.load: (str(marker),)}[func]
    payload = {"ok": np.zeros(3), "nested": [1, {"deep": _RunsCommand(func, *args)}]}
    for protocol in (0, 2, pickle.HIGHEST_PROTOCOL):
        with pytest.raises(UnsafePickleError, match=blocked) as err:
            safe_load(pickle.dumps(payload, protocol=protocol))
        assert "refusing" in str(err.value)
    assert not marker.exists()


def test_storage_bytes_are_read_weights_only(tmp_path):
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_RunsCommand(os.system, f"touch {marker}"), buf, _use_new_zipfile_serialization=False)

    class StorageFromBytes:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (buf.getvalue(),)

    with pytest.raises(pickle.UnpicklingError):
        safe_load(pickle.dumps({"w": StorageFromBytes()}))
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:TypedStorage is deprecated")
def test_tensor_rebuilders_refuse_hooks_and_odd_arguments():
    class HookedTensor:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, (torch.zeros(2).storage(), 0, (2,), (1,), False,
                                                     collections.OrderedDict(h=print))

    with pytest.raises(UnsafePickleError, match="builtins.print"):
        safe_load(pickle.dumps(HookedTensor()))

    class NotAStorage:
        def __reduce__(self):
            return torch._utils._rebuild_tensor_v2, ("abc", 0, (2,), (1,), False, collections.OrderedDict())

    with pytest.raises(UnsafePickleError, match="storage"):
        safe_load(pickle.dumps(NotAStorage()))


def test_persistent_objects_become_records_or_mapped_classes(monkeypatch):
    import sys
    import types

    persistence = types.ModuleType("torch_utils.persistence")

    def _reconstruct_persistent_obj(meta):
        raise AssertionError("must not run")

    _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
    _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
    persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
    monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
    monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)

    class Obj:
        def __init__(self, class_name, state):
            self.class_name, self.state = class_name, state

        def __reduce__(self):
            return _reconstruct_persistent_obj, (dict(type="class", version=6, module_src="raise SystemExit",
                                                      class_name=self.class_name, state=self.state),)

    lin = torch.nn.Linear(3, 2)
    child = Obj("MPConv", {"_parameters": {"weight": lin.weight}, "_buffers": {}, "_modules": {},
                           "_init_args": (3, 2), "_init_kwargs": {"kernel": []}})
    parent = Obj("Net", {"_parameters": {"gain": torch.nn.Parameter(torch.ones([]))},
                         "_buffers": {"freqs": torch.arange(3.0), "tmp": torch.zeros(1)},
                         "_non_persistent_buffers_set": {"tmp"}, "_modules": {"conv": child, "none": None},
                         "_init_args": (), "_init_kwargs": {"width": 4}})
    blob = pickle.dumps({"net": parent})
    bad = pickle.dumps(Obj("X", None))
    monkeypatch.undo()

    rec = safe_load(blob)["net"]
    assert isinstance(rec, PersistentObject) and rec.class_name == "Net" and rec.init_kwargs == {"width": 4}
    sd = module_state_dict(rec)
    assert list(sd) == ["gain", "freqs", "conv.weight"] and torch.equal(sd["conv.weight"], lin.weight.detach())

    built = safe_load(blob, persistent_classes={"MPConv": lambda r: ("built", r.init_args, r.init_kwargs)})
    assert built["net"].state["_modules"]["conv"] == ("built", (3, 2), {"kernel": []})

    with pytest.raises(UnsafePickleError, match="malformed"):
        safe_load(bad)


def test_easydict_and_input_errors(tmp_path):
    d = EasyDict(a=1)
    d.b = 2
    assert d == {"a": 1, "b": 2} and d.a == 1
    with pytest.raises(AttributeError):
        d.missing
    with pytest.raises(FileNotFoundError):
        safe_load(tmp_path / "nope.pkl")
    with pytest.raises(TypeError):
        safe_load(123)

    class WithPersistentIds(pickle.Pickler):  # how torch.save refers to storages
        def persistent_id(self, obj):
            return ("storage", 0) if isinstance(obj, str) and obj == "tensor-data" else None

    buf = io.BytesIO()
    WithPersistentIds(buf).dump({"x": "tensor-data"})
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_load(buf.getvalue())
