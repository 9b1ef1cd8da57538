//! Tensors: a contiguous buffer on some backend, a shape and an element type.

use crate::backend::BackendCore;
use anyhow::{bail, Result};
use std::fmt;

/// Element types. `F64` exists on the CPU backend only (gradient checks); `I32` holds token ids and labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F64,
    F32,
    BF16,
    F16,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
        }
    }
    pub fn is_float(self) -> bool {
        !matches!(self, DType::I32)
    }
    /// Machine epsilon of the storage type (unit roundoff ×2), used to size test tolerances.
    pub fn eps(self) -> f64 {
        match self {
            DType::F64 => f64::EPSILON,
            DType::F32 => f32::EPSILON as f64,
            DType::BF16 => 0.0078125,
            DType::F16 => 0.0009765625,
            DType::I32 => 0.0,
        }
    }
    pub fn parse(s: &str) -> Result<DType> {
        Ok(match s {
            "f64" | "fp64" => DType::F64,
            "f32" | "fp32" => DType::F32,
            "bf16" => DType::BF16,
            "f16" | "fp16" => DType::F16,
            "i32" => DType::I32,
            _ => bail!("unknown dtype {s:?} (expected f64, f32, bf16, f16 or i32)"),
        })
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            DType::F64 => "f64",
            DType::F32 => "f32",
            DType::BF16 => "bf16",
            DType::F16 => "f16",
            DType::I32 => "i32",
        };
        f.write_str(s)
    }
}

/// A contiguous, row-major tensor owned by backend `B`.
pub struct Tensor<B: BackendCore> {
    pub buf: B::Buf,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

impl<B: BackendCore> Tensor<B> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// A tensor of zeros.
    pub fn zeros(be: &B, shape: &[usize], dtype: DType) -> Result<Self> {
        let n = shape.iter().product();
        Ok(Tensor {
            buf: be.alloc(dtype, n)?,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A tensor from host values (rounded to `dtype` on the way in).
    pub fn from_f64(be: &B, data: &[f64], shape: &[usize], dtype: DType) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            bail!(
                "Tensor::from_f64: shape {shape:?} needs {n} values, got {}",
                data.len()
            );
        }
        let mut t = Self::zeros(be, shape, dtype)?;
        be.upload_f64(&mut t.buf, dtype, data)?;
        Ok(t)
    }

    pub fn from_f32(be: &B, data: &[f32], shape: &[usize], dtype: DType) -> Result<Self> {
        let d: Vec<f64> = data.iter().map(|&x| x as f64).collect();
        Self::from_f64(be, &d, shape, dtype)
    }

    pub fn from_i32(be: &B, data: &[i32], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            bail!(
                "Tensor::from_i32: shape {shape:?} needs {n} values, got {}",
                data.len()
            );
        }
        let mut t = Self::zeros(be, shape, DType::I32)?;
        be.upload_i32(&mut t.buf, data)?;
        Ok(t)
    }

    pub fn to_f64_vec(&self, be: &B) -> Result<Vec<f64>> {
        be.download_f64(&self.buf, self.dtype, self.numel())
    }

    pub fn to_f32_vec(&self, be: &B) -> Result<Vec<f32>> {
        Ok(self.to_f64_vec(be)?.into_iter().map(|x| x as f32).collect())
    }

    /// Overwrite the contents from host values; the length must match.
    pub fn copy_from_f64(&mut self, be: &B, data: &[f64]) -> Result<()> {
        if data.len() != self.numel() {
            bail!(
                "copy_from_f64: tensor {:?} has {} elements, got {}",
                self.shape,
                self.numel(),
                data.len()
            );
        }
        be.upload_f64(&mut self.buf, self.dtype, data)
    }

    pub fn copy_from_i32(&mut self, be: &B, data: &[i32]) -> Result<()> {
        if data.len() != self.numel() || self.dtype != DType::I32 {
            bail!(
                "copy_from_i32: tensor {:?} {} vs {} i32 values",
                self.shape,
                self.dtype,
                data.len()
            );
        }
        be.upload_i32(&mut self.buf, data)
    }

    pub fn zero_(&mut self, be: &B) -> Result<()> {
        let n = self.numel();
        be.zero(&mut self.buf, self.dtype, n)
    }

    /// A new tensor with the same values in another dtype.
    pub fn cast(&self, be: &B, dtype: DType) -> Result<Self> {
        let mut t = Self::zeros(be, &self.shape, dtype)?;
        be.cast(&mut t.buf, dtype, &self.buf, self.dtype, self.numel())?;
        Ok(t)
    }

    /// Copy `src` (any float dtype, same element count) into `self`, converting.
    pub fn assign(&mut self, be: &B, src: &Tensor<B>) -> Result<()> {
        if src.numel() != self.numel() {
            bail!(
                "assign: shapes {:?} and {:?} differ in size",
                self.shape,
                src.shape
            );
        }
        let n = self.numel();
        be.cast(&mut self.buf, self.dtype, &src.buf, src.dtype, n)
    }

    pub fn reshape(mut self, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != self.numel() {
            bail!(
                "reshape {:?} -> {shape:?}: element counts differ",
                self.shape
            );
        }
        self.shape = shape.to_vec();
        Ok(self)
    }

    /// Error unless the tensor has this shape; `what` names it in the message (e.g. "layernorm_forward: inp").
    pub fn expect(&self, what: &str, shape: &[usize]) -> Result<()> {
        if self.shape != shape {
            bail!("{what}: expected shape {shape:?}, found {:?}", self.shape);
        }
        Ok(())
    }

    pub fn expect_dtype(&self, what: &str, dtypes: &[DType]) -> Result<()> {
        if !dtypes.contains(&self.dtype) {
            bail!(
                "{what}: dtype {} not supported here (expected one of {dtypes:?})",
                self.dtype
            );
        }
        Ok(())
    }
}

impl<B: BackendCore> fmt::Debug for Tensor<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Tensor({:?}, {})", self.shape, self.dtype)
    }
}
