import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.convert import load_pretrained
from jaxtl.convert.io import detect_format
from jaxtl.convert.registry import demo_weights_file
from jaxtl.models import create_model


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
