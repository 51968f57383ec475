-- Subjects by number of triplets, next to their sampling probability.
SELECT t.subject, count(*) AS triplets, s.n_images, round(s.probability, 5) AS probability
FROM triplets t
JOIN subjects s ON s.subject = t.subject
GROUP BY t.subject, s.n_images, s.probability
ORDER BY triplets DESC, t.subject
LIMIT 20;
