-- Caption length distribution (words), with one example caption per bucket.
SELECT
  array_length(string_to_array(caption, ' ')) AS words,
  count(*) AS captions,
  min(caption) AS example
FROM captions
GROUP BY 1
ORDER BY 1;
