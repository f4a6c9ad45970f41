//! Element types, named as safetensors names them.

use serde::{Deserialize, Serialize};

/// The element type of a tensor. Serialized with safetensors' spelling
/// (`"F32"`, `"BF16"`, ...), so shard headers are valid safetensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[non_exhaustive]
pub enum DType {
    /// Boolean, one byte.
    #[serde(rename = "BOOL")]
    Bool,
    /// Unsigned 8-bit integer.
    #[serde(rename = "U8")]
    U8,
    /// Signed 8-bit integer.
    #[serde(rename = "I8")]
    I8,
    /// Unsigned 16-bit integer.
    #[serde(rename = "U16")]
    U16,
    /// Signed 16-bit integer.
    #[serde(rename = "I16")]
    I16,
    /// IEEE half precision.
    #[serde(rename = "F16")]
    F16,
    /// bfloat16.
    #[serde(rename = "BF16")]
    BF16,
    /// Unsigned 32-bit integer.
    #[serde(rename = "U32")]
    U32,
    /// Signed 32-bit integer.
    #[serde(rename = "I32")]
    I32,
    /// IEEE single precision.
    #[serde(rename = "F32")]
    F32,
    /// Unsigned 64-bit integer.
    #[serde(rename = "U64")]
    U64,
    /// Signed 64-bit integer.
    #[serde(rename = "I64")]
    I64,
    /// IEEE double precision.
    #[serde(rename = "F64")]
    F64,
}

impl DType {
    /// Size of one element in bytes.
    ///
    /// ```
    /// assert_eq!(ckpt_core::DType::BF16.size(), 2);
    /// ```
    pub const fn size(self) -> usize {
        match self {
            DType::Bool | DType::U8 | DType::I8 => 1,
            DType::U16 | DType::I16 | DType::F16 | DType::BF16 => 2,
            DType::U32 | DType::I32 | DType::F32 => 4,
            DType::U64 | DType::I64 | DType::F64 => 8,
        }
    }

    /// The safetensors name, e.g. `"F32"`.
    pub const fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::U16 => "U16",
            DType::I16 => "I16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::U32 => "U32",
            DType::I32 => "I32",
            DType::F32 => "F32",
            DType::U64 => "U64",
            DType::I64 => "I64",
            DType::F64 => "F64",
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
