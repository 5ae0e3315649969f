"""`python -m nvila_ft.train` with accelerate's FSDP allowed on CPU processes (tests only).

    accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2 tests/fsdp_on_cpu.py RECIPE [k=v ...]

accelerate 1.15 applies an FSDP config only to accelerator devices: `AcceleratorState.__init__` sets
`DistributedType.FSDP` only when the launch is MULTI_GPU / NPU / XPU / ..., so on a CPU (gloo, MULTI_CPU) the
config is dropped without a word and the run is plain DDP. torch's FSDP itself runs on CPU with gloo; this shim
lets accelerate use it there, so the test trains through the same Trainer / accelerate / FSDP path a GPU run
takes (wrap policy, use_orig_params, optimizer groups, FULL_STATE_DICT save). Everything else is the real CLI.
"""

import sys

import torch
import torch.distributed.fsdp as fsdp
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_allowing_cpu_fsdp(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Every later AcceleratorState() copies PartialState's shared dict over its own: set both, or
        # accelerate's clip_grad_norm_ (and others) would see MULTI_CPU again and clip with a rank-local norm.
        for shared in (self.__dict__, PartialState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
            shared["device"] = torch.device("cpu")  # MULTI_CPU says cpu:0; FSDP compares it with the params' "cpu"
        self.fsdp_plugin = fsdp_plugin
        for config in (fsdp_plugin.state_dict_config, fsdp_plugin.optim_state_dict_config):
            config.offload_to_cpu = False  # see _full_state_dict_config_without_offload
        print("fsdp_on_cpu: FSDP enabled on a CPU launch", flush=True)


AcceleratorState.__init__ = _init_allowing_cpu_fsdp


_FullStateDictConfig = fsdp.FullStateDictConfig


def _full_state_dict_config_without_offload(offload_to_cpu: bool = False, rank0_only: bool = False):
    """FULL_STATE_DICT "offloaded to CPU" from parameters already on the CPU is broken (torch 2.13: the clone of
    a gathered parameter segfaults; a gathered optimizer state aliases freed memory, so optimizer.bin holds
    garbage). On the CPU there is nothing to offload, so the gathered copies stay as they are."""
    return _FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only)


fsdp.FullStateDictConfig = _full_state_dict_config_without_offload  # accelerate imports it at each get_state_dict call

if __name__ == "__main__":
    from nvila_ft.train.cli import main

    sys.exit(main())
