//! The fold engine of the analytics service.
pub mod records;
