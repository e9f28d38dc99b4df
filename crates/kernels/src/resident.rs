//! Which host tensor a device-resident copy was made from. The dispatching `item_loglik`
//! runs once per scoring batch with the same LM head ([V, d]: 57 MB for SmolLM2 in bf16, 1 GB
//! for Llama-3-8B); converting and copying it on every call would cost more than the kernel.
//! The CUDA path keeps the last uploaded head on the device, keyed by a [`ResidentKey`].
//!
//! The key is the tensor's identity (candle's `TensorId`), shape, source dtype, the device
//! dtype it was converted to, and the bits of 16 values sampled across it. candle tensors are
//! immutable; the one way to change values under the same id is `Var::set`, which the sampled
//! values catch unless the change avoids every sampled position: never modify an LM head in
//! place while scoring with it.

use anyhow::Result;
use candle_core::{DType, Tensor, TensorId};

/// Values sampled for the key.
pub const PROBES: usize = 16;

/// Identity of a host tensor as uploaded in one device dtype.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResidentKey {
    id: TensorId,
    dims: Vec<usize>,
    source: DType,
    device: DType,
    probe: Vec<u32>,
}

impl ResidentKey {
    /// The key of `t` uploaded as `device` (reads PROBES values of `t`).
    pub fn of(t: &Tensor, device: DType) -> Result<Self> {
        let n = t.elem_count();
        let probe = if n == 0 {
            Vec::new()
        } else {
            let idx: Vec<u32> = (0..PROBES)
                .map(|i| ((i * (n - 1)) / (PROBES - 1)) as u32)
                .collect();
            let idx = Tensor::new(idx.as_slice(), t.device())?;
            t.flatten_all()?
                .index_select(&idx, 0)?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?
                .into_iter()
                .map(f32::to_bits)
                .collect()
        };
        Ok(Self {
            id: t.id(),
            dims: t.dims().to_vec(),
            source: t.dtype(),
            device,
            probe,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn key_tracks_identity_dtype_and_in_place_changes() {
        let t = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .unwrap()
            .reshape((8, 8))
            .unwrap();
        let k = ResidentKey::of(&t, DType::BF16).unwrap();
        assert_eq!(k, ResidentKey::of(&t.clone(), DType::BF16).unwrap());
        assert_ne!(k, ResidentKey::of(&t, DType::F32).unwrap());
        // Equal values, another tensor: another key (uploaded again, never confused).
        assert_ne!(k, ResidentKey::of(&t.copy().unwrap(), DType::BF16).unwrap());
        // A Var changed in place keeps its id; the sampled values change the key.
        let v = Var::from_tensor(&t).unwrap();
        let before = ResidentKey::of(v.as_tensor(), DType::BF16).unwrap();
        v.set(&(t.clone() + 1.0).unwrap()).unwrap();
        let after = ResidentKey::of(v.as_tensor(), DType::BF16).unwrap();
        assert_ne!(before, after);
        assert_eq!(
            ResidentKey::of(
                &Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap(),
                DType::F32
            )
            .unwrap()
            .probe
            .len(),
            0
        );
    }
}
