//! train (see src/train)
