//! Column slices (`shaders/slice.wgsl`): `narrow_cols` takes columns `offset..offset + n` of every row of a
//! `[.., W]` tensor; its backward puts the gradient back into those columns of a zero `[.., W]` tensor.

use anyhow::{bail, Result};

use crate::gpu::{DType, Shader, Tensor};

static SHADER: Shader = crate::shader!("slice");
const WG: usize = 256;

fn rows_width(x: &Tensor) -> Result<(usize, usize)> {
    match x.shape().split_last() {
        Some((&w, lead)) => Ok((lead.iter().product(), w)),
        None => bail!("narrow_cols: a scalar has no columns"),
    }
}

/// y[.., c] = x[.., offset + c] for c < n.
pub fn narrow_cols(x: &Tensor, offset: usize, n: usize) -> Result<Tensor> {
    let (rows, width) = rows_width(x)?;
    if offset + n > width {
        bail!("narrow_cols: columns {offset}..{} beyond width {width}", offset + n);
    }
    let mut shape = x.shape().to_vec();
    *shape.last_mut().expect("non-scalar") = n;
    let y = Tensor::empty(x.gpu(), &shape, DType::F32)?;
    let params = [rows as u32, width as u32, offset as u32, n as u32];
    x.gpu().dispatch(
        &SHADER,
        "narrow_cols_forward",
        &[x.buffer(), y.buffer()],
        &params,
        (rows * n).div_ceil(WG) as u32,
    )?;
    Ok(y)
}

/// dx [.., width]: dy in columns offset..offset + n, zeros elsewhere.
pub fn narrow_cols_backward(dy: &Tensor, offset: usize, width: usize) -> Result<Tensor> {
    let (rows, n) = rows_width(dy)?;
    if offset + n > width {
        bail!(
            "narrow_cols_backward: columns {offset}..{} beyond width {width}",
            offset + n
        );
    }
    let mut shape = dy.shape().to_vec();
    *shape.last_mut().expect("non-scalar") = width;
    let dx = Tensor::empty(dy.gpu(), &shape, DType::F32)?;
    let params = [rows as u32, width as u32, offset as u32, n as u32];
    let groups = (rows * width).div_ceil(WG) as u32;
    dy.gpu().dispatch(
        &SHADER,
        "narrow_cols_backward",
        &[dy.buffer(), dx.buffer()],
        &params,
        groups,
    )?;
    Ok(dx)
}

pub mod reference {
    pub fn narrow_cols(x: &[f32], width: usize, offset: usize, n: usize) -> Vec<f64> {
        x.chunks(width)
            .flat_map(|row| row[offset..offset + n].iter().map(|&v| v as f64))
            .collect()
    }

    pub fn narrow_cols_backward(dy: &[f32], n: usize, offset: usize, width: usize) -> Vec<f64> {
        dy.chunks(n)
            .flat_map(|row| {
                (0..width).map(move |c| {
                    if c >= offset && c < offset + n {
                        row[c - offset] as f64
                    } else {
                        0.0
                    }
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::test_gpu;
    use crate::ops::testing::{assert_close, random_vec, Tol};

    #[test]
    fn narrow_cols_matches_reference() {
        let gpu = test_gpu();
        let (rows, width, offset, n) = (37, 99, 31, 33);
        let x = random_vec(5, rows * width, 1.0);
        let y = narrow_cols(&Tensor::from_slice(gpu, &x, &[1, rows, width]).unwrap(), offset, n).unwrap();
        assert_eq!(y.shape(), &[1, rows, n]);
        assert_close(
            "narrow_cols",
            &y.to_vec().unwrap(),
            &reference::narrow_cols(&x, width, offset, n),
            Tol::KERNEL,
        );
        assert!(narrow_cols(&y, 30, 4).is_err());
    }

    #[test]
    fn narrow_cols_grad_is_the_adjoint() {
        // <narrow(x), dy> == <x, narrow_backward(dy)> for every x and dy: the backward is the exact adjoint.
        let gpu = test_gpu();
        let (rows, width, offset, n) = (13, 70, 5, 64);
        let dy = random_vec(6, rows * n, 1.0);
        let dx = narrow_cols_backward(&Tensor::from_slice(gpu, &dy, &[rows, n]).unwrap(), offset, width).unwrap();
        let want = reference::narrow_cols_backward(&dy, n, offset, width);
        assert_close("narrow_cols_backward", &dx.to_vec().unwrap(), &want, Tol::KERNEL);
        let x = random_vec(7, rows * width, 1.0);
        let lhs: f64 = reference::narrow_cols(&x, width, offset, n)
            .iter()
            .zip(&dy)
            .map(|(a, b)| a * *b as f64)
            .sum();
        let rhs: f64 = x.iter().zip(&want).map(|(a, b)| *a as f64 * b).sum();
        assert!((lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0));
    }
}
