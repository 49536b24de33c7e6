"""Measure the two ceilings of this GPU: device-to-device copy bandwidth (bytes read plus written) and a large
bf16/tf32 matrix product through cuBLAS, on random data. Used by scripts/gpu_check.sh; the floors in
bench/NOTES.md are divided by these.

    python bench/ceilings.py
"""
import torch
import triton


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("ceilings: no CUDA device")
    dev = torch.device("cuda")
    n = 1 << 30  # 1 GiB each way
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    print(f"copy: {2 * n / ms / 1e6:.0f} GB/s (1 GiB read + 1 GiB written, median {ms:.3f} ms)")
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "tf32")):
        torch.backends.cuda.matmul.allow_tf32 = dtype == torch.float32
        a = torch.randn(8192, 8192, device=dev, dtype=dtype)
        b = torch.randn(8192, 8192, device=dev, dtype=dtype)
        ms = triton.testing.do_bench(lambda: a @ b, warmup=25, rep=200, quantiles=[0.5])
        ms = ms[0] if isinstance(ms, (list, tuple)) else ms
        print(f"gemm {name} 8192^3: {2 * 8192 ** 3 / ms / 1e9:.0f} TFLOP/s (median {ms:.3f} ms)")
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device: {torch.cuda.get_device_name()}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs")


if __name__ == "__main__":
    main()
