//! What kind of failure an error is, for callers that act on the kind rather than the words:
//! the C ABI maps each kind to one status code (`ffi/`), the CLI could map it to an exit code.
//! Every runtime error type answers `kind()` with an exhaustive match, so a new variant has to
//! say what it is where it is defined, not in a mapping far away.

/// The kinds of runtime failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The bundle is missing, damaged, inconsistent or not one this runtime reads.
    Bundle,
    /// No execution provider (or not the requested one) could run a graph.
    Provider,
    /// An image could not be read or does not fit the model.
    Image,
    /// An argument the caller gave is not acceptable (an empty prompt, a bad option).
    InvalidArgument,
    /// A graph ran and failed or produced something unusable (a wrong shape, NaN).
    Inference,
    /// The bundle or graph needs what this runtime does not have (no generator, no restorers,
    /// an input element type the engines do not feed).
    Unsupported,
}

impl crate::BundleError {
    pub fn kind(&self) -> ErrorKind {
        match self {
            // The bundle is fine; it just lacks what was asked of it.
            crate::BundleError::MissingPrecision { .. } => ErrorKind::Unsupported,
            _ => ErrorKind::Bundle,
        }
    }
}

impl crate::EngineError {
    pub fn kind(&self) -> ErrorKind {
        use crate::EngineError as E;
        match self {
            E::ProviderUnavailable { .. } | E::NoProvider { .. } | E::ModelNotFound { .. } => {
                ErrorKind::Provider
            }
            E::ModelFile { .. } => ErrorKind::Bundle,
            E::UnsupportedInputType { .. } => ErrorKind::Unsupported,
            E::SampleInput { .. } => ErrorKind::InvalidArgument,
            E::MissingInput { .. }
            | E::UnknownInput { .. }
            | E::DuplicateInput { .. }
            | E::InputDType { .. }
            | E::Run { .. }
            | E::Output { .. } => ErrorKind::Inference,
        }
    }
}

impl crate::ImageError {
    pub fn kind(&self) -> ErrorKind {
        ErrorKind::Image
    }
}

impl crate::CaptionError {
    pub fn kind(&self) -> ErrorKind {
        use crate::CaptionError as E;
        match self {
            E::Bundle(e) => e.kind(),
            E::Engine(e) => e.kind(),
            E::Image(e) => e.kind(),
            E::Tokenizer { .. } => ErrorKind::Bundle,
            E::NoQuestions => ErrorKind::Unsupported,
            E::InvalidOption(_)
            | E::EmptyPrompt
            | E::PromptTooLong { .. }
            | E::TextTooLong { .. }
            | E::UnknownWords { .. }
            | E::Encode { .. } => ErrorKind::InvalidArgument,
            E::Decode { .. } | E::Shape { .. } | E::NonFinite { .. } => ErrorKind::Inference,
        }
    }
}

impl crate::GenerateError {
    pub fn kind(&self) -> ErrorKind {
        use crate::GenerateError as E;
        match self {
            E::Bundle(e) => e.kind(),
            E::Engine(e) => e.kind(),
            E::Tokenizer { .. } => ErrorKind::Bundle,
            E::NoGenerator | E::NoDream => ErrorKind::Unsupported,
            E::Caption(e) => e.kind(),
            E::NoPrompts
            | E::TooMany { .. }
            | E::EmptyPrompt { .. }
            | E::PromptTooLong { .. }
            | E::UnknownWords { .. }
            | E::Encode { .. }
            | E::InvalidOption(_) => ErrorKind::InvalidArgument,
            E::Diffusion(_) | E::Shape { .. } | E::NonFinite { .. } => ErrorKind::Inference,
        }
    }
}

impl crate::EmbedError {
    pub fn kind(&self) -> ErrorKind {
        use crate::EmbedError as E;
        match self {
            E::Bundle(e) => e.kind(),
            E::Engine(e) => e.kind(),
            E::Image(e) => e.kind(),
            E::Tokenizer { .. } => ErrorKind::Bundle,
            E::NoTextEncoder => ErrorKind::Unsupported,
            E::Text(e) => e.kind(),
            E::Shape { .. } | E::NonFinite { .. } => ErrorKind::Inference,
        }
    }
}

impl crate::ClassifyError {
    pub fn kind(&self) -> ErrorKind {
        use crate::ClassifyError as E;
        match self {
            E::Bundle(e) => e.kind(),
            E::Engine(e) => e.kind(),
            E::Image(e) => e.kind(),
            E::Tokenizer { .. } => ErrorKind::Bundle,
            E::NoRestorer => ErrorKind::Unsupported,
            E::NothingGiven
            | E::EmptyText
            | E::TextTooLong { .. }
            | E::UnknownWords { .. }
            | E::Encode { .. } => ErrorKind::InvalidArgument,
            E::Diffusion(_) | E::Shape { .. } | E::NonFinite { .. } => ErrorKind::Inference,
        }
    }
}

impl crate::Error {
    pub fn kind(&self) -> ErrorKind {
        use crate::Error as E;
        match self {
            E::Bundle(e) => e.kind(),
            E::Engine(e) => e.kind(),
            E::Image(e) => e.kind(),
            E::Caption(e) => e.kind(),
            E::Generate(e) => e.kind(),
            E::Classify(e) => e.kind(),
            E::Embed(e) => e.kind(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ClassifyError, EmbedError, GenerateError};

    /// Errors passed from one pipeline to another keep what they are: a non-finite output of
    /// the encoders used by classification stays a non-finite error (it used to become a
    /// "shape" error), and the kind survives every hop.
    #[test]
    fn errors_keep_their_kind_across_pipelines() {
        let nan = EmbedError::NonFinite {
            graph: "text_encoder".into(),
            output: "text_embedding".into(),
        };
        let c = ClassifyError::from(nan);
        assert!(matches!(c, ClassifyError::NonFinite { .. }), "{c:?}");
        assert_eq!(c.kind(), ErrorKind::Inference);

        let empty = GenerateError::EmptyPrompt { index: 0 };
        assert_eq!(empty.kind(), ErrorKind::InvalidArgument);
        let c = ClassifyError::from(EmbedError::Text(empty));
        assert!(matches!(c, ClassifyError::EmptyText), "{c:?}");
        assert_eq!(c.kind(), ErrorKind::InvalidArgument);

        let g = GenerateError::NonFinite {
            graph: "text_encoder".into(),
            output: "text_tokens".into(),
        };
        assert!(matches!(
            ClassifyError::from(g),
            ClassifyError::NonFinite { .. }
        ));
        assert_eq!(GenerateError::NoGenerator.kind(), ErrorKind::Unsupported);
        assert_eq!(ClassifyError::NoRestorer.kind(), ErrorKind::Unsupported);
    }
}
