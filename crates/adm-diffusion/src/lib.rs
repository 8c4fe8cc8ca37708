//! adm-diffusion
