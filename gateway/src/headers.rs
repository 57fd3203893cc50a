//! Reading HTTP header values the way the RFCs write them: comma-separated lists.

use axum::http::HeaderValue;

/// The items of comma-separated header values (`Connection`, `Sec-WebSocket-Protocol`,
/// `X-Forwarded-For`, ...), trimmed, in order; values that are not text are skipped.
pub(crate) fn header_list<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = &'a str> {
    values
        .into_iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
}
