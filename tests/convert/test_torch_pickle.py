"""The restricted .pth reader: values equal torch's own loader; code-running pickles are refused unexecuted."""

from __future__ import annotations

import collections
import os
import pickle
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import torch

from jaxtl.convert import TorchFileError, UnsafePickleError, load_torch_state_dict
from jaxtl.convert.torch_pickle import load_torch_file


def _tensors() -> collections.OrderedDict:
    g = torch.Generator().manual_seed(0)
    base = torch.arange(20, dtype=torch.float32)
    return collections.OrderedDict(
        conv=torch.randn(4, 3, 3, 3, generator=g),
        transposed=torch.randn(3, 5, generator=g).t(),  # non-contiguous strides
        sliced=base[7:13],  # non-zero storage offset into a shared storage
        shared=base.view(4, 5),
        half=torch.randn(6, generator=g).half(),
        bf16=torch.randn(6, generator=g).bfloat16(),
        double=torch.randn(2, 2, generator=g, dtype=torch.float64),
        long=torch.tensor(7),  # 0-d, like num_batches_tracked
        int8=torch.tensor([-3, 4], dtype=torch.int8),
        flags=torch.tensor([True, False]),
        empty=torch.zeros(0, 4),
    )


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_values_match_torch(tmp_path, zip_format):
    sd = _tensors()
    path = tmp_path / "t.pth"
    torch.save(sd, path, _use_new_zipfile_serialization=zip_format)
    out = load_torch_state_dict(path)
    assert list(out) == list(sd)
    for k, t in sd.items():
        ref = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        assert out[k].shape == ref.shape, k
        assert np.array_equal(np.asarray(out[k], dtype=ref.dtype), ref), k
        assert out[k].flags["C_CONTIGUOUS"]
    assert out["bf16"].dtype.name == "bfloat16"


def test_module_state_dict_and_checkpoint_wrappers(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    sd = m.state_dict()  # carries _metadata, set through pickle's BUILD opcode
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, tmp_path / "ckpt.pth")
    out = load_torch_state_dict(tmp_path / "ckpt.pth")
    assert set(out) == set(sd)
    np.testing.assert_array_equal(out["0.weight"], sd["0.weight"].numpy())


def _torch_like_zip(path, payload: bytes) -> None:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (os.system, (f"touch {self.sentinel}",))


def test_malicious_pickle_refused_without_running(tmp_path):
    sentinel = tmp_path / "pwned"
    payload = pickle.dumps(collections.OrderedDict(conv1_weight=_Evil(sentinel)), protocol=2)

    # The payload is live: a plain unpickler runs it.
    pickle.loads(payload)
    assert sentinel.exists()
    sentinel.unlink()

    zipped = tmp_path / "evil.pth"
    _torch_like_zip(zipped, payload)
    legacy = tmp_path / "evil_legacy.pth"
    legacy.write_bytes(pickle.dumps(_Evil(sentinel), protocol=2))
    for path in (zipped, legacy):
        with pytest.raises(UnsafePickleError) as err:
            load_torch_state_dict(path)
        msg = str(err.value)
        assert str(path) in msg and "system" in msg and "state_dict" in msg
        assert not sentinel.exists()


@pytest.mark.parametrize("protocol", [2, 4])
def test_other_dangerous_globals_refused(tmp_path, protocol):
    sentinel = tmp_path / "pwned"

    class EvalEvil:
        def __reduce__(self):
            return (eval, (f"open({str(sentinel)!r}, 'w')",))

    path = tmp_path / "e.pth"
    _torch_like_zip(path, pickle.dumps({"w": EvalEvil()}, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=r"'(__builtin__|builtins)\.eval'"):
        load_torch_file(path)
    assert not sentinel.exists()


def test_build_on_non_dict_refused(tmp_path):
    # BUILD (__setstate__) on anything but the state dict's OrderedDict is refused.
    payload = (
        b"\x80\x02ctorch._utils\n_rebuild_parameter\n"  # a callable allowed by name...
        b"}(X\x01\x00\x00\x00aK\x01ub."  # ...then BUILD with a dict state on it
    )
    path = tmp_path / "b.pth"
    _torch_like_zip(path, payload)
    with pytest.raises(UnsafePickleError, match="refusing to set the state"):
        load_torch_file(path)


def test_whole_pickled_module_refused(tmp_path):
    path = tmp_path / "model.pth"
    torch.save(torch.nn.Linear(2, 3), path)
    with pytest.raises(UnsafePickleError, match="torch.nn.modules.linear.Linear"):
        load_torch_state_dict(path)


def test_not_a_torch_file(tmp_path):
    path = tmp_path / "x.pth"
    path.write_bytes(b"hello world")
    with pytest.raises(TorchFileError, match="neither a zip nor a legacy"):
        load_torch_state_dict(path)
    with pytest.raises(FileNotFoundError):
        load_torch_state_dict(tmp_path / "missing.pth")


def test_truncated_storage(tmp_path):
    src = tmp_path / "ok.pth"
    torch.save({"w": torch.ones(16)}, src)
    bad = tmp_path / "bad.pth"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(bad, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            zout.writestr(name, data[:8] if name.endswith("data/0") else data)
    with pytest.raises(TorchFileError, match="truncated"):
        load_torch_state_dict(bad)


def test_reader_never_imports_torch(resnet18_pth):
    code = (
        "import sys; import jaxtl.convert as c; "
        f"v = c.load_torchvision({str(resnet18_pth)!r}, 'resnet18'); "
        "assert v['params']['body']['conv1']['kernel'].shape == (7, 7, 3, 64); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


def test_truncated_legacy_file(tmp_path):
    src = tmp_path / "ok.pth"
    torch.save({"w": torch.ones(1000)}, src, _use_new_zipfile_serialization=False)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(src.read_bytes()[:-100])
    with pytest.raises(TorchFileError, match="truncated"):
        load_torch_state_dict(bad)
