"""The generator's inference path (hpcstain.models.fastpath): the fused up-levels give the
same bits as torch's modules; channels_last is a recorded convention of a volume run."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import zarr
from micro import fails_after, untrained_generator_checkpoint
from torch import nn

from hpcstain.errors import UsageError
from hpcstain.models.fastpath import UpsamplePad, fuse_upsample_pad
from hpcstain.volume import init_run, make_plan, open_volume
from hpcstain.volume.rundir import axis_store, plan_path

CL = torch.channels_last


def torch_up_pad(x: torch.Tensor) -> torch.Tensor:
    return nn.ReflectionPad2d(1)(nn.Upsample(scale_factor=2, mode="nearest")(x))


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (1, 3, 1, 1), (2, 4, 1, 6), (1, 16, 9, 9)])
@pytest.mark.parametrize("out_format", [torch.contiguous_format, CL])
@pytest.mark.parametrize("in_format", [torch.contiguous_format, CL])
def test_upsample_pad_is_torchs_upsample_then_reflection_pad_bit_for_bit(
        shape, out_format, in_format) -> None:
    x = torch.randn(*shape).contiguous(memory_format=in_format)
    with torch.inference_mode():
        out = UpsamplePad(out_format)(x)
    assert torch.equal(out, torch_up_pad(x))
    assert out.is_contiguous(memory_format=out_format)
    cut = torch.randn(2, 3, 6, 8)[:, :, 1:5, ::2]  # any strides in
    assert torch.equal(UpsamplePad()(cut), torch_up_pad(cut))


def test_upsample_pad_with_autograd_is_torchs_ops() -> None:
    x = torch.randn(1, 2, 4, 5, requires_grad=True)
    y = x.detach().clone().requires_grad_(True)
    UpsamplePad()(x).square().sum().backward()
    torch_up_pad(y).square().sum().backward()
    assert torch.equal(x.grad, y.grad)


def small_generator(generator: str, upsampling: str = "resize") -> nn.Module:
    from hpcstain.config import ModelConfig
    from hpcstain.models.networks import build_generator

    cfg = ModelConfig(generator=generator, ngf=4, n_blocks=5 if generator == "unet" else 1,
                      upsampling=upsampling)
    torch.manual_seed(0)
    return build_generator(cfg, 3, 3).eval()


@pytest.mark.parametrize("generator", ["unet", "resnet"])
def test_fused_generator_gives_the_same_bits_and_keeps_its_parameter_names(generator) -> None:
    net = small_generator(generator)
    keys = list(net.state_dict())
    x = torch.rand(3, 3, 40, 36) * 2 - 1
    with torch.inference_mode():
        before = net(x)
        assert fuse_upsample_pad(net) == (5 if generator == "unet" else 2)
        after = net(x)
    assert torch.equal(before, after)
    assert list(net.state_dict()) == keys
    assert fuse_upsample_pad(small_generator(generator, "transpose")) == 0


def unet_checkpoint(path):
    return untrained_generator_checkpoint(path, generator="unet", upsampling="resize",
                                          n_blocks=5)


def test_channels_last_tile_function_is_within_float_tolerance(tmp_path) -> None:
    from hpcstain.inference import load_generator

    ckpt = unet_checkpoint(tmp_path / "g.pt")
    batch = torch.linspace(-1, 1, 2 * 3 * 48 * 40).reshape(2, 3, 48, 40).sin()
    plain = load_generator(ckpt).fn(batch)
    cl = load_generator(ckpt, memory_format="channels_last").fn(batch)
    assert cl.is_contiguous() and cl.shape == plain.shape
    torch.testing.assert_close(cl, plain, atol=1e-4, rtol=0)
    with pytest.raises(UsageError):
        load_generator(ckpt, memory_format="nhwc")


def ct_volume(tmp_path):
    data = np.random.default_rng(0).integers(8000, 32000, (12, 40, 36)).astype(np.uint16)
    zarr.create_array(str(tmp_path / "ct.zarr"), data=data)
    return open_volume(tmp_path / "ct.zarr")


def test_channels_last_run_resumes_byte_exactly_and_stays_close_to_contiguous(tmp_path):
    from hpcstain.executors import run_local
    from hpcstain.volume.stain import PinnedStainer

    ckpt, src = unet_checkpoint(tmp_path / "g.pt"), ct_volume(tmp_path)

    def plan_run(name, fmt):
        plan = make_plan(src, chunk=6, axes="z,y", tile=32, step=24, checkpoint=ckpt,
                         levels=(30000.0, 10000.0), memory_format=fmt)
        return init_run(tmp_path / name, plan)

    contiguous = plan_run("contiguous", "contiguous")
    run_local(contiguous, progress=False)
    straight = plan_run("straight", "channels_last")
    run_local(straight, progress=False)
    resumed = plan_run("resumed", "channels_last")
    with pytest.raises(RuntimeError):
        run_local(resumed, fails_after(PinnedStainer(str(resumed))(), 2), batch_size=2,
                  progress=False)
    run_local(resumed, progress=False)  # resumed from the plan: channels_last again
    for axis in "zy":
        a, b, c = (zarr.open_array(str(axis_store(r, axis)), mode="r")[...].astype(int)
                   for r in (straight, resumed, contiguous))
        np.testing.assert_array_equal(a, b)
        assert np.abs(a - c).max() <= 1  # the last float bits move a few values one level
    with pytest.raises(UsageError, match="memory_format"):  # a run keeps its layout
        plan_run("straight", "contiguous")


def test_a_plan_without_the_field_reads_as_contiguous(tmp_path) -> None:
    from hpcstain.volume.plan import load_plan

    src = ct_volume(tmp_path)
    plan = make_plan(src, chunk=6, axes="z", tile=32, step=24, levels=(30000.0, 10000.0),
                     in_channels=3)
    assert plan.memory_format == "contiguous"
    run = init_run(tmp_path / "run", dataclasses.replace(plan, memory_format="channels_last"))
    data = json.loads(plan_path(run).read_text())
    assert data.pop("memory_format") == "channels_last"
    plan_path(run).write_text(json.dumps(data))  # as written before the field existed
    assert load_plan(run).memory_format == "contiguous"
    with pytest.raises(UsageError):
        make_plan(src, chunk=6, levels=(30000.0, 10000.0), in_channels=3,
                  memory_format="nhwc")
