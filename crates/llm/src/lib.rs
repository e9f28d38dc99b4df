pub use llm4dsr_kernels;
