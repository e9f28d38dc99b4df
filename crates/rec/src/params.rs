//! The trainable parameters of a backbone, in one fixed order. Every parameter is a candle
//! `Var` (so autograd sees it) and also a slice of one flat f32 vector: gradients are
//! flattened into ONE buffer for a single all-reduce per step, Adam updates the flat vector,
//! and checkpoints store named tensors. Initial values come from `KeyedRng(seed, Init,
//! parameter index)`, never from candle's unseedable CPU RNG, so every rank and every run
//! starts from the same weights.

use anyhow::{bail, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use llm4dsr_data::rng::{KeyedRng, Purpose};
use std::collections::HashMap;
use std::path::Path;

/// How a parameter's initial values are drawn.
#[derive(Clone, Copy, Debug)]
pub enum Init {
    /// Normal(0, std).
    Normal(f32),
    /// Uniform(-a, a).
    Uniform(f32),
    /// Xavier/Glorot normal from the first two dims (fan_out, fan_in).
    XavierNormal,
    Zeros,
    Ones,
}

/// One named parameter.
pub struct Param {
    pub name: String,
    pub shape: Vec<usize>,
    pub var: Var,
    /// Offset of this parameter in the flat vector.
    pub offset: usize,
}

/// The ordered parameter set of one model.
pub struct ParamStore {
    params: Vec<Param>,
    seed: u64,
    numel: usize,
}

impl ParamStore {
    pub fn new(seed: u64) -> Self {
        Self {
            params: Vec::new(),
            seed,
            numel: 0,
        }
    }

    /// Create a parameter; returns its tensor (shares storage with the `Var`, so in-place
    /// updates are visible to the model that keeps it).
    pub fn add(&mut self, name: &str, shape: &[usize], init: Init) -> Result<Tensor> {
        self.add_inner(name, shape, init, false)
    }

    /// An embedding table whose row 0 (padding) starts at zero.
    pub fn add_embedding(
        &mut self,
        name: &str,
        rows: usize,
        dim: usize,
        init: Init,
    ) -> Result<Tensor> {
        self.add_inner(name, &[rows, dim], init, true)
    }

    fn add_inner(
        &mut self,
        name: &str,
        shape: &[usize],
        init: Init,
        zero_row0: bool,
    ) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let index = self.params.len() as u64;
        let mut rng = KeyedRng::new(self.seed, Purpose::Init, index);
        let mut v: Vec<f32> = match init {
            Init::Normal(std) => (0..n).map(|_| (rng.normal() as f32) * std).collect(),
            Init::Uniform(a) => (0..n).map(|_| (rng.next_f32() * 2.0 - 1.0) * a).collect(),
            Init::XavierNormal => {
                let fan_out = shape[0] as f64;
                let fan_in = shape.get(1).copied().unwrap_or(1) as f64;
                let std = (2.0 / (fan_in + fan_out)).sqrt();
                (0..n).map(|_| (rng.normal() * std) as f32).collect()
            }
            Init::Zeros => vec![0.0; n],
            Init::Ones => vec![1.0; n],
        };
        if zero_row0 {
            let d = n / shape[0];
            v[..d].iter_mut().for_each(|x| *x = 0.0);
        }
        let var = Var::from_vec(v, shape, &Device::Cpu)?;
        let t = var.as_tensor().clone();
        self.params.push(Param {
            name: name.to_string(),
            shape: shape.to_vec(),
            var,
            offset: self.numel,
        });
        self.numel += n;
        Ok(t)
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Total number of scalars.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// All values, concatenated in parameter order.
    pub fn flat_values(&self) -> Result<Vec<f32>> {
        let mut out = Vec::with_capacity(self.numel);
        for p in &self.params {
            out.extend(p.var.as_tensor().flatten_all()?.to_vec1::<f32>()?);
        }
        Ok(out)
    }

    /// Overwrite every parameter from a flat vector (in place: models see the new values).
    pub fn set_flat(&self, flat: &[f32]) -> Result<()> {
        if flat.len() != self.numel {
            bail!(
                "flat parameter vector has {} values, the model {}",
                flat.len(),
                self.numel
            );
        }
        for p in &self.params {
            let n: usize = p.shape.iter().product();
            let t = Tensor::from_slice(
                &flat[p.offset..p.offset + n],
                p.shape.as_slice(),
                &Device::Cpu,
            )?;
            p.var.set(&t)?;
        }
        Ok(())
    }

    /// Copy every parameter's gradient into `buf[..numel]` (zeros where a parameter got none).
    pub fn flat_grads(&self, grads: &GradStore, buf: &mut [f32]) -> Result<()> {
        for p in &self.params {
            let n: usize = p.shape.iter().product();
            let dst = &mut buf[p.offset..p.offset + n];
            match grads.get(p.var.as_tensor()) {
                Some(g) => dst.copy_from_slice(&g.flatten_all()?.to_vec1::<f32>()?),
                None => dst.iter_mut().for_each(|x| *x = 0.0),
            }
        }
        Ok(())
    }

    /// Named tensors (for safetensors).
    pub fn named_tensors(&self) -> HashMap<String, Tensor> {
        self.params
            .iter()
            .map(|p| (p.name.clone(), p.var.as_tensor().clone()))
            .collect()
    }

    /// Load values saved by `named_tensors`, checking every name and shape.
    pub fn load_named(&self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        for p in &self.params {
            let t = tensors.get(&p.name).with_context(|| {
                format!(
                    "{}: tensor `{}` missing (not a checkpoint of this model?)",
                    source.display(),
                    p.name
                )
            })?;
            if t.dims() != p.shape.as_slice() {
                bail!(
                    "{}: tensor `{}` has shape {:?}, the model expects {:?} (checkpoint from another catalogue size or model config?)",
                    source.display(),
                    p.name,
                    t.dims(),
                    p.shape
                );
            }
            p.var.set(&t.to_dtype(candle_core::DType::F32)?)?;
        }
        if tensors.len() != self.params.len() {
            bail!(
                "{}: holds {} tensors, the model has {} parameters",
                source.display(),
                tensors.len(),
                self.params.len()
            );
        }
        Ok(())
    }
}
