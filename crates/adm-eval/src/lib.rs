//! adm-eval
