//! The few layers the backbones share, written with candle primitives only: candle-nn's fused
//! CPU layer-norm and softmax kernels have no backward pass, these do.

use anyhow::Result;
use candle_core::{Tensor, D};

/// A dense layer stored as W [in, out] (so `x @ W` needs no transpose) and b [out].
#[derive(Clone)]
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    pub fn new(
        store: &mut crate::params::ParamStore,
        name: &str,
        d_in: usize,
        d_out: usize,
        init: crate::params::Init,
        bias: bool,
    ) -> Result<Self> {
        let w = store.add(&format!("{name}.weight"), &[d_in, d_out], init)?;
        let b = if bias {
            Some(store.add(
                &format!("{name}.bias"),
                &[d_out],
                crate::params::Init::Zeros,
            )?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    /// Applies to the last dim of `x` (any number of leading dims).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let d_in = *dims.last().unwrap();
        let rows = x.elem_count() / d_in;
        let y = x.reshape((rows, d_in))?.matmul(&self.w)?;
        let y = match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().unwrap() = self.w.dim(1)?;
        Ok(y.reshape(out)?)
    }
}

/// Layer normalisation over the last dim.
#[derive(Clone)]
pub struct LayerNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn new(
        store: &mut crate::params::ParamStore,
        name: &str,
        d: usize,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            gamma: store.add(&format!("{name}.weight"), &[d], crate::params::Init::Ones)?,
            beta: store.add(&format!("{name}.bias"), &[d], crate::params::Init::Zeros)?,
            eps,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dim(D::Minus1)? as f64;
        let mean = (x.sum_keepdim(D::Minus1)? / d)?;
        let xc = x.broadcast_sub(&mean)?;
        let var = (xc.sqr()?.sum_keepdim(D::Minus1)? / d)?;
        let xn = xc.broadcast_mul(&(var + self.eps)?.sqrt()?.recip()?)?;
        Ok(xn.broadcast_mul(&self.gamma)?.broadcast_add(&self.beta)?)
    }
}

/// Softmax over the last dim (max-subtracted).
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// Look up rows of an embedding table: ids [..] u32 -> [.., d].
pub fn embed(table: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let d = table.dim(1)?;
    let mut shape = ids.dims().to_vec();
    shape.push(d);
    Ok(table.index_select(&ids.flatten_all()?, 0)?.reshape(shape)?)
}

/// log-softmax over the last dim.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let z = x.broadcast_sub(&max)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}
