//! Tensors: a view of a backend buffer (an allocation, an element offset and a length), a shape and an
//! element type. Most tensors own their whole allocation; the flat parameter buffers
//! (src/model/params.rs) and the activation plan (src/model/acts.rs) hand out views of one allocation.
//!
//! Host transfers are typed: [`Tensor::from_host`] / [`Tensor::to_host`] move `f32`, `bf16`, `f16`, `i32` (and
//! `f64` on the CPU) as they are stored; [`Tensor::from_f64`] and [`Tensor::to_f64_vec`] convert on the host
//! (narrowing rounds through f32 to nearest-even, as a GPU upload of f32 data would).

use crate::backend::BackendCore;
use anyhow::{bail, Result};
use half::{bf16, f16};
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

/// A host element type that a tensor stores as is.
pub trait HostScalar: bytemuck::Pod + Send + Sync + 'static {
    const DTYPE: DType;
}
impl HostScalar for f64 {
    const DTYPE: DType = DType::F64;
}
impl HostScalar for f32 {
    const DTYPE: DType = DType::F32;
}
impl HostScalar for bf16 {
    const DTYPE: DType = DType::BF16;
}
impl HostScalar for f16 {
    const DTYPE: DType = DType::F16;
}
impl HostScalar for i32 {
    const DTYPE: DType = DType::I32;
}

/// Host values as the bytes of `dtype` storage: f64 kept (F64), else through f32, rounded to nearest even.
pub fn encode_f64(data: &[f64], dtype: DType) -> Vec<u8> {
    match dtype {
        DType::F64 => bytemuck::cast_slice(data).to_vec(),
        DType::F32 => {
            let v: Vec<f32> = data.iter().map(|&x| x as f32).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::BF16 => {
            let v: Vec<bf16> = data.iter().map(|&x| bf16::from_f32(x as f32)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::F16 => {
            let v: Vec<f16> = data.iter().map(|&x| f16::from_f32(x as f32)).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
        DType::I32 => {
            let v: Vec<i32> = data.iter().map(|&x| x as i32).collect();
            bytemuck::cast_slice(&v).to_vec()
        }
    }
}

/// The bytes of `dtype` storage as f64 values.
pub fn decode_f64(bytes: &[u8], dtype: DType) -> Vec<f64> {
    fn each<T: bytemuck::Pod>(b: &[u8], f: impl Fn(T) -> f64) -> Vec<f64> {
        b.chunks_exact(std::mem::size_of::<T>())
            .map(|c| f(bytemuck::pod_read_unaligned(c)))
            .collect()
    }
    match dtype {
        DType::F64 => each::<f64>(bytes, |x| x),
        DType::F32 => each::<f32>(bytes, |x| x as f64),
        DType::BF16 => each::<bf16>(bytes, |x| x.to_f64()),
        DType::F16 => each::<f16>(bytes, |x| x.to_f64()),
        DType::I32 => each::<i32>(bytes, |x| x as f64),
    }
}

/// A contiguous, row-major tensor: a view of a buffer of backend `B`.
pub struct Tensor<B: BackendCore> {
    pub(crate) buf: B::Buf,
    shape: Vec<usize>,
    dtype: DType,
}

impl<B: BackendCore> Tensor<B> {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn bytes(&self) -> usize {
        self.numel() * self.dtype.size()
    }

    /// A tensor of zeros in a fresh allocation.
    pub fn zeros(be: &B, shape: &[usize], dtype: DType) -> Result<Self> {
        let n = shape.iter().product();
        Ok(Tensor {
            buf: be.alloc(dtype, n)?,
            shape: shape.to_vec(),
            dtype,
        })
    }

    /// A view of `shape` starting `offset` elements into this tensor (the same allocation). Only the owners of
    /// shared allocations (flat parameters, the activation plan) make views; the CPU backend checks at run time
    /// that overlapping views are never borrowed mutably at the same time.
    pub(crate) fn view(&self, be: &B, offset: usize, shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if offset + n > self.numel() {
            bail!(
                "view of {shape:?} at element {offset} exceeds a tensor of {} elements",
                self.numel()
            );
        }
        Ok(Tensor {
            buf: be.view(&self.buf, self.dtype, offset, n)?,
            shape: shape.to_vec(),
            dtype: self.dtype,
        })
    }

    /// A tensor holding `data` as it is (dtype `T::DTYPE`).
    pub fn from_host<T: HostScalar>(be: &B, data: &[T], shape: &[usize]) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            bail!(
                "Tensor::from_host: shape {shape:?} needs {n} values, got {}",
                data.len()
            );
        }
        let mut t = Self::zeros(be, shape, T::DTYPE)?;
        be.upload(&mut t.buf, T::DTYPE, bytemuck::cast_slice(data))?;
        Ok(t)
    }

    /// A tensor from host values, converted to `dtype` on the host.
    pub fn from_f64(be: &B, data: &[f64], shape: &[usize], dtype: DType) -> Result<Self> {
        let n: usize = shape.iter().product();
        if n != data.len() {
            bail!(
                "Tensor::from_f64: shape {shape:?} needs {n} values, got {}",
                data.len()
            );
        }
        let mut t = Self::zeros(be, shape, dtype)?;
        be.upload(&mut t.buf, dtype, &encode_f64(data, dtype))?;
        Ok(t)
    }

    /// A tensor from f32 host values, converted to `dtype` on the host (stored as is when `dtype` is f32).
    pub fn from_f32(be: &B, data: &[f32], shape: &[usize], dtype: DType) -> Result<Self> {
        if dtype == DType::F32 {
            return Self::from_host(be, data, shape);
        }
        let d: Vec<f64> = data.iter().map(|&x| x as f64).collect();
        Self::from_f64(be, &d, shape, dtype)
    }

    pub fn from_i32(be: &B, data: &[i32], shape: &[usize]) -> Result<Self> {
        Self::from_host(be, data, shape)
    }

    /// The contents as stored; `T` must be this tensor's dtype.
    pub fn to_host<T: HostScalar>(&self, be: &B) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            bail!(
                "to_host: tensor {:?} is {}, asked for {}",
                self.shape,
                self.dtype,
                T::DTYPE
            );
        }
        let mut out = vec![T::zeroed(); self.numel()];
        be.download(&self.buf, self.dtype, bytemuck::cast_slice_mut(&mut out))?;
        Ok(out)
    }

    /// The contents as f64 (downloaded as stored, widened on the host).
    pub fn to_f64_vec(&self, be: &B) -> Result<Vec<f64>> {
        let mut bytes = vec![0u8; self.bytes()];
        be.download(&self.buf, self.dtype, &mut bytes)?;
        Ok(decode_f64(&bytes, self.dtype))
    }

    pub fn to_f32_vec(&self, be: &B) -> Result<Vec<f32>> {
        if self.dtype == DType::F32 {
            return self.to_host(be);
        }
        Ok(self.to_f64_vec(be)?.into_iter().map(|x| x as f32).collect())
    }

    /// Overwrite the contents with `data` as it is; `T` must be this tensor's dtype and the length must match.
    pub fn copy_from_host<T: HostScalar>(&mut self, be: &B, data: &[T]) -> Result<()> {
        if T::DTYPE != self.dtype || data.len() != self.numel() {
            bail!(
                "copy_from_host: tensor {:?} {} vs {} {} values",
                self.shape,
                self.dtype,
                data.len(),
                T::DTYPE
            );
        }
        be.upload(&mut self.buf, self.dtype, bytemuck::cast_slice(data))
    }

    /// Overwrite the contents from host values, converted to this tensor's dtype; the length must match.
    pub fn copy_from_f64(&mut self, be: &B, data: &[f64]) -> Result<()> {
        if data.len() != self.numel() {
            bail!(
                "copy_from_f64: tensor {:?} has {} elements, got {}",
                self.shape,
                self.numel(),
                data.len()
            );
        }
        be.upload(&mut self.buf, self.dtype, &encode_f64(data, self.dtype))
    }

    /// Overwrite from f32 host values (as is when this tensor is f32, else converted).
    pub fn copy_from_f32(&mut self, be: &B, data: &[f32]) -> Result<()> {
        if self.dtype == DType::F32 {
            return self.copy_from_host(be, data);
        }
        let d: Vec<f64> = data.iter().map(|&x| x as f64).collect();
        self.copy_from_f64(be, &d)
    }

    pub fn copy_from_i32(&mut self, be: &B, data: &[i32]) -> Result<()> {
        self.copy_from_host(be, data)
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
