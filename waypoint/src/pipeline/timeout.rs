//! Stage: the route's timeouts (the whole request, each try) around an upstream future.

use super::UpstreamError;
use futures_util::FutureExt;
use futures_util::future::Either;
use std::future::Future;
use std::time::Duration;

/// Awaits `fut`, or [`UpstreamError::Timeout`] if it takes longer than `limit`.
///
/// Not an `async fn`: one keeps its arguments apart from the state it awaits, so `fut`
/// would be stored twice (as the argument and inside the timeout), doubling the size of
/// every request's future, which is moved whole when a request starts. The deadline is
/// set when this is called (both callers await it at once), and it needs a Tokio runtime.
pub fn within<T, F>(
    limit: Option<Duration>,
    fut: F,
) -> impl Future<Output = Result<T, UpstreamError>>
where
    F: Future<Output = Result<T, UpstreamError>>,
{
    match limit {
        Some(t) => Either::Left(
            tokio::time::timeout(t, fut).map(|r| r.unwrap_or(Err(UpstreamError::Timeout))),
        ),
        None => Either::Right(fut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_future_that_never_ends_times_out_one_that_is_ready_does_not() {
        let never = std::future::pending::<Result<(), UpstreamError>>();
        assert_eq!(
            within(Some(Duration::from_millis(1)), never).await,
            Err(UpstreamError::Timeout)
        );
        let ready = async { Ok::<_, UpstreamError>(7) };
        assert_eq!(within(Some(Duration::from_secs(3600)), ready).await, Ok(7));
        let failed = async { Err::<(), _>(UpstreamError::Connect("refused".into())) };
        assert_eq!(
            within(None, failed).await,
            Err(UpstreamError::Connect("refused".into())),
            "no limit: the outcome as it is"
        );
    }
}
