import torch

from meshattn.bench.memory import PeakMemory, SavedActivations, optimizer_state_bytes, tensor_bytes


def test_saved_activations_counts_each_storage_once_and_skips_parameters():
    lin = torch.nn.Linear(16, 8, bias=False)
    x = torch.randn(4, 16, requires_grad=True)
    with SavedActivations(lin.parameters()) as saved:
        y = lin(x)
        z = (y * y).sum()  # saves y (twice, one storage)
    z.backward()
    assert saved.nbytes == x.numel() * 4 + y.numel() * 4


def test_peak_memory_sees_a_large_temporary():
    with PeakMemory("cpu") as mem:
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        del t
    assert mem.peak >= mem.baseline
    if mem.resettable:
        assert mem.delta >= 60 * 2**20


def test_optimizer_state_bytes():
    p = torch.nn.Parameter(torch.zeros(10))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(10)
    opt.step()
    assert optimizer_state_bytes(opt) == 2 * 40 + tensor_bytes([opt.state[p]["step"]])
