//! adm-data
