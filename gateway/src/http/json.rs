//! Reading JSON request bodies into OpenAI-style errors. axum's own `Json` extractor answers
//! malformed input with plain-text 400/415/422, which OpenAI clients cannot parse; here every
//! failure is a 400 (or 413) JSON error whose `param` names the offending field, and whose
//! message never quotes request text (it could be a prompt).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use hyserve_coordinator::api::ServeError;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::error::ApiError;
use crate::server::State;

/// A request body that parsed as a JSON object (typed decoding comes after, with
/// [`decode`], so one body can feed several typed views).
#[derive(Debug)]
pub(crate) struct JsonObject(pub Value);

impl FromRequest<Arc<State>> for JsonObject {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &Arc<State>) -> Result<Self, Self::Rejection> {
        // The router sets axum's `DefaultBodyLimit` to `max_body_bytes`; reading past it is
        // the only way this read fails with 413.
        let body = Bytes::from_request(req, state).await.map_err(|rej| {
            if rej.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.cfg.max_body_bytes,
                }
            } else {
                ServeError::invalid("", "could not read the request body").into()
            }
        })?;
        let value: Value = serde_json::from_slice(&body).map_err(|e| {
            // Syntax errors carry a position, never the offending text.
            ServeError::invalid("", format!("the request body is not valid JSON: {e}"))
        })?;
        if !value.is_object() {
            return Err(ServeError::invalid("", "the request body must be a JSON object").into());
        }
        Ok(JsonObject(value))
    }
}

/// Decodes `value` into `T`; an error names the field (`messages[0].content`) as `param`.
pub(crate) fn decode<T: DeserializeOwned>(value: &Value) -> Result<T, ServeError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = sanitize(&e.inner().to_string());
        // A missing field is reported at its parent; name the field itself.
        let field = match message
            .strip_prefix("missing field `")
            .and_then(|m| m.strip_suffix('`'))
        {
            Some(missing) if path == "." => missing.to_string(),
            Some(missing) => format!("{path}.{missing}"),
            None if path == "." => String::new(),
            None => path,
        };
        let message = match (field.as_str(), message.starts_with("data did not match")) {
            ("prompt", true) => "`prompt` must be a string, an array of token ids, or an array \
                                 holding one of those"
                .to_string(),
            ("stop", true) => "`stop` must be a string or an array of strings".to_string(),
            ("seed", true) => "`seed` must be an integer".to_string(),
            (f, true) if f.ends_with(".content") => {
                format!("`{f}` must be a string or an array of content parts")
            }
            (f, _) if !f.is_empty() => format!("`{f}`: {message}"),
            _ => message,
        };
        ServeError::invalid(&field, message)
    })
}

/// serde's "invalid type: string \"...\", expected ..." quotes the value, which may be
/// prompt text sent under the wrong field; keep the type, drop the value.
fn sanitize(message: &str) -> String {
    for kind in ["invalid type: string ", "invalid value: string "] {
        if let Some(rest) = message.strip_prefix(kind)
            && let Some(at) = rest.rfind(", expected ")
        {
            return format!("{}{}", kind.trim_end(), &rest[at..]);
        }
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)] // only the decoding matters
    struct Req {
        model: String,
        n: Option<u64>,
        messages: Option<Vec<Msg>>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Msg {
        role: String,
        content: u32,
    }

    fn param(v: Value) -> (String, String) {
        match decode::<Req>(&v).unwrap_err() {
            ServeError::InvalidRequest { field, message } => (field, message),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn errors_name_the_field_and_never_quote_text() {
        let (f, m) = param(serde_json::json!({"n": 1}));
        assert_eq!(f, "model");
        assert!(m.contains("missing field"), "{m}");
        let (f, m) = param(serde_json::json!({"model": "m", "n": "secret prompt"}));
        assert_eq!(f, "n");
        assert!(!m.contains("secret"), "{m}");
        assert!(m.contains("expected u64"), "{m}");
        let (f, _) = param(serde_json::json!({"model": "m", "messages": [{"role": "user"}]}));
        assert_eq!(f, "messages[0].content");
        let (f, m) = param(
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "secret"}]}),
        );
        assert_eq!(f, "messages[0].content");
        assert!(!m.contains("secret"), "{m}");
    }
}
