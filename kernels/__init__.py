"""Engine-independent attention kernels (torch and triton only, never vLLM)."""
