"""The cuda backend of the LSTM layer: csrc/lstm.cu's persistent kernels (W_hh split across the SMs and kept in
shared memory for the whole sequence, one grid-wide sync a step), with pydlx/triton/lstm.py's signatures. No
projections (proj_size > 0). The input projection and the weight gradients around it are the cuda linear's
(cuBLAS), chosen by ops/lstm.py like the Triton path's."""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch


def smem_bytes(H: int, elt: int, sms: int) -> int:
    """Shared memory a block of csrc/lstm.cu's persistent kernels needs (the larger of forward and backward), from
    the extension itself (its launches size themselves by the same function): ceil(H / SMs) hidden units a block,
    their W_hh rows (forward) or columns (backward) plus the staged h / dz. The extension must be loaded (the cuda
    backend's device check loads it before any call asks this)."""
    return torch.ops.pydlx.lstm_smem_bytes(H, elt, sms)


@functools.lru_cache(maxsize=16)
def _device(index: int) -> Tuple[int, int]:
    props = torch.cuda.get_device_properties(index)
    return props.multi_processor_count, props.shared_memory_per_block_optin


def supports(call, device) -> Optional[str]:
    """None if the persistent kernels run this call (a registry.LSTMCall), else why not."""
    if call.cell:
        return "the C++/CUDA LSTM kernel is for whole sequences (pydlx.nn.LSTM); cells run on triton"
    return why_cannot(device, call.dtype.itemsize, call.H, call.P)


def why_cannot(device: torch.device, elt: int, H: int, P: int) -> Optional[str]:
    if P != H:
        return "proj_size > 0 is not supported by the C++/CUDA LSTM kernel (auto runs cuDNN for it)"
    sms, optin = _device(device.index if device.index is not None else torch.cuda.current_device())
    need = smem_bytes(H, elt, sms)
    if need > optin:
        return (f"hidden_size {H} does not fit the persistent kernel: W_hh split over {sms} SMs needs {need} bytes "
                f"of shared memory a block, the GPU has {optin}; the triton backend takes it")
    return None


def lstm_fwd(G: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor,
             lengths: Optional[torch.Tensor], reverse: bool, save: bool, path: Optional[str] = None,
             w_hr: Optional[torch.Tensor] = None):
    """(y, hs, cs, acts, rs) as pydlx.triton.lstm.lstm_fwd (rs is empty: no projections)."""
    if w_hr is not None:
        raise RuntimeError("pydlx.cuda.lstm: the C++/CUDA LSTM kernel has no projections")
    y, hs, cs, acts = torch.ops.pydlx.lstm_seq_fwd_cuda(G, w_hh, h0, c0, lengths, reverse, save)
    return y, hs, cs, acts, G.new_empty(0)


def lstm_bwd(dy: torch.Tensor, dh_n: torch.Tensor, dc_n: torch.Tensor, acts: torch.Tensor, cs: torch.Tensor,
             w_hh: torch.Tensor, lengths: Optional[torch.Tensor], reverse: bool, w_hr: Optional[torch.Tensor] = None):
    """(dz, dh0, dc0, dht) as pydlx.triton.lstm.lstm_bwd (dht is empty: no projections)."""
    dz, dh0, dc0 = torch.ops.pydlx.lstm_seq_bwd_cuda(dy, dh_n, dc_n, acts, cs, w_hh, lengths, reverse)
    return dz, dh0, dc0, dz.new_empty(0)
