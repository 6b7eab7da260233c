"""`ltx-lora` with accelerate's FSDP on the CPU (gloo), for tests only: run it as the training script of
`accelerate launch --config_file configs/accelerate/fsdp.yaml tests/fsdp_on_cpu.py train CONFIG`.

accelerate turns the FSDP plugin it reads from the config file on only for GPU-type processes; CPU processes fall
back to plain data parallelism. This script lets the CPU processes keep that plugin, so the trainer's FSDP path
(accelerate's `fully_shard` of the transformer blocks, gathering the LoRA, resume into the sharded model) runs on
gloo exactly as it would on GPUs, apart from the device and the precision (fp32 on the CPU)."""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_keeping_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


AcceleratorState.__init__ = _init_keeping_fsdp_on_cpu

if __name__ == "__main__":
    from trainer.cli import main

    sys.exit(main(sys.argv[1:]))
