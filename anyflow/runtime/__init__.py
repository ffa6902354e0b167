"""How a model runs, applied to it from outside: devices and precision, float8 weights, block offload, FSDP2
and Ulysses parallelism, memory and compute estimates, interrupts.

    devices.py           a device checked to exist, dtype names resolved (auto, float8 included), precision settings
    fp8.py               the scaled float8 weight format and the layers that hold it
    offload.py           block offload: hooks that bring each block's weights to the device as it runs
    parallel.py          parallelize: FSDP2 weight sharding; ranks that agree before they fail
    sequence_parallel.py Ulysses: the token stream split over ranks, by hooks and an attention function
    processes.py         the processes of a run: one, or torchrun's ranks, set up and torn down once
    memory.py, compute.py  what a sampling run needs, estimated before anything is allocated
    video_shape.py       a video's size against the latents and the model's grid
    interrupts.py        Ctrl-C and SIGTERM as one clean way out, within seconds
    torch_support.py     the oldest torch this project runs on

It imports the model package (:mod:`anyflow.model`) and nothing above it.
"""
