import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.convert import load_pretrained
from jaxtl.convert.io import detect_format
from jaxtl.convert.registry import demo_weights_file
from jaxtl.models import create_model


@pytest.mark.slow
def test_demo_weights_are_the_seeded_init_through_the_timm_conversion_path(tmp_path):
    path = demo_weights_file("demo:resnet18", "resnet18", tmp_path)
    assert detect_format(path) == "timm"
    got = load_pretrained("demo:resnet18", "resnet18", cache_dir=tmp_path)
    model = create_model("resnet18", 1000, head="linear")
    ref = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_ref = dict(jax.tree_util.tree_leaves_with_path(ref))
    assert len(flat_got) == len(flat_ref)
    for k, v in flat_got:
        np.testing.assert_array_equal(v, np.asarray(flat_ref[k]), err_msg=str(k))
    # another seed gives other weights; a mismatched arch is refused with the fix
    other = load_pretrained("demo:resnet18:1", "resnet18", cache_dir=tmp_path)
    assert not np.array_equal(other["params"]["body"]["conv1"]["kernel"], got["params"]["body"]["conv1"]["kernel"])
    with pytest.raises(ValueError, match="use demo:resnet34"):
        load_pretrained("demo:resnet18", "resnet34", cache_dir=tmp_path)


def test_demo_conversion_is_cached_and_redone_when_the_source_changes(tmp_path, monkeypatch):
    import jaxtl.convert.registry as registry

    first = load_pretrained("demo:resnet18", "resnet18", cache_dir=tmp_path)
    converted = tmp_path / "demo" / "resnet18-seed0.converted.safetensors"
    assert converted.is_file()
    calls = []
    real = registry.convert_file
    monkeypatch.setattr(registry, "convert_file", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = load_pretrained("demo:resnet18", "resnet18", cache_dir=tmp_path)
    assert calls == []  # read from the cached conversion
    for (ka, a), (kb, b) in zip(jax.tree_util.tree_leaves_with_path(first), jax.tree_util.tree_leaves_with_path(again),
                                strict=True):
        assert ka == kb and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # a regenerated source (other size/mtime) or a damaged cached file is converted again
    src = tmp_path / "demo" / "resnet18-seed0.safetensors"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    load_pretrained("demo:resnet18", "resnet18", cache_dir=tmp_path)
    converted.write_bytes(b"not a safetensors file")
    load_pretrained("demo:resnet18", "resnet18", cache_dir=tmp_path)
    assert len(calls) == 2
    load_pretrained("demo:resnet18", "resnet18", cache_dir=tmp_path)
    assert len(calls) == 2  # the rewritten cache is used again
