//! The one mapping from client errors to Python exceptions: a `patchflow.Error` subclass named
//! after the gRPC code (`patchflow/_errors.py` defines them), carrying the daemon's message,
//! the code and the endpoint.

use patchflow_client::ClientError;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;
use tonic_code::name_of;

/// gRPC code names as the exception classes spell them.
mod tonic_code {
    use patchflow_client::ClientError;

    /// The class name for the code of `e`, or for what the error means when no daemon answered.
    pub(crate) fn name_of(e: &ClientError) -> &'static str {
        if let Some(code) = e.code() {
            return code_name(code as i32);
        }
        match e {
            ClientError::NoEndpoints
            | ClientError::InvalidEndpoint { .. }
            | ClientError::Config { .. }
            | ClientError::Credentials { .. } => "InvalidArgument",
            ClientError::Tls { .. } => "Unauthenticated",
            ClientError::SharedMemory { .. } => "FailedPrecondition",
            ClientError::Protocol { .. } => "Internal",
            _ => "Unavailable",
        }
    }

    /// The class name of a gRPC status code (numbers as in the gRPC specification).
    pub(crate) fn code_name(code: i32) -> &'static str {
        match code {
            1 => "Cancelled",
            2 => "Unknown",
            3 => "InvalidArgument",
            4 => "DeadlineExceeded",
            5 => "NotFound",
            6 => "AlreadyExists",
            7 => "PermissionDenied",
            8 => "ResourceExhausted",
            9 => "FailedPrecondition",
            10 => "Aborted",
            11 => "OutOfRange",
            12 => "Unimplemented",
            13 => "Internal",
            14 => "Unavailable",
            15 => "DataLoss",
            16 => "Unauthenticated",
            _ => "Unknown",
        }
    }
}

/// A `patchflow.<class_name>` exception with `message`; `endpoint` when one daemon is concerned.
pub(crate) fn error(class_name: &str, message: &str, endpoint: Option<&str>) -> PyErr {
    Python::attach(|py| {
        let made = (|| -> PyResult<Bound<'_, PyAny>> {
            let module = py.import("patchflow._errors")?;
            let class = module.getattr(class_name)?;
            let exc = class.call1((message,))?;
            exc.setattr("endpoint", endpoint)?;
            Ok(exc)
        })();
        match made {
            Ok(exc) => PyErr::from_value(exc),
            // The package's Python part is missing (the native module imported alone).
            Err(_) => PyRuntimeError::new_err(format!("{class_name}: {message}")),
        }
    })
}

/// A client error as its Python exception: the message is the client's, which names the
/// endpoint and carries the daemon's own message.
pub(crate) fn client_error(e: &ClientError) -> PyErr {
    let endpoint = match e {
        ClientError::InvalidEndpoint { endpoint, .. }
        | ClientError::Server { endpoint, .. }
        | ClientError::GaveUp { endpoint, .. }
        | ClientError::Protocol { endpoint, .. }
        | ClientError::SharedMemory { endpoint, .. }
        | ClientError::Tls { endpoint, .. }
        | ClientError::Closed { endpoint } => Some(endpoint.as_str()),
        _ => None,
    };
    error(name_of(e), &e.to_string(), endpoint)
}

/// An `InvalidArgument` for a bad value of the argument `name`.
pub(crate) fn invalid(name: &str, reason: impl std::fmt::Display) -> PyErr {
    error("InvalidArgument", &format!("{name}: {reason}"), None)
}
